"""Knowledge distillation: pure losses and the methods by name (`losses.py`), the objective a training stage
optimizes (`objective.py`), the frozen teacher (`teacher.py`) and its cache of answers (`cache.py`).

The package imports nothing itself: the recipe validates method names against `losses.METHODS` without
loading the teacher's model code."""
