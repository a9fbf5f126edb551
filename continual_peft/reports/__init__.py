"""Reports: a run's, a grid's and a leaderboard's, as JSON, Markdown, CSV and plots, built
from plain report dicts (never from the learner)."""
