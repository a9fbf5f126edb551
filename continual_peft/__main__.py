"""`python -m continual_peft ...` is the `continual-peft` command (e.g. under torchrun)."""

from continual_peft.cli import app

if __name__ == "__main__":
    app(prog_name="continual-peft")
