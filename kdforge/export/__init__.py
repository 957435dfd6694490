"""Export: the builders of each format (`builders.py`, `int8.py`), pure converters (`converters.py`) and the
export/verify flow over a finished run (`artifacts.py`). The table of formats is `kdforge.formats`."""
