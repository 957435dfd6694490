"""Training: the one loop (`kdforge.train.loop`), checkpoints, event consumers and the stages built on them
(`kdforge.train.stages`). Import from those modules directly."""
