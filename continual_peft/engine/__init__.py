"""The engine: the learner's loop (begin, train, end, checkpoint, report), the module bank and
heads it trains, the routed forward it predicts with, and the forgetting monitor."""
