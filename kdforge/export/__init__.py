"""Export: a table of formats (`formats.py`), pure converters (`converters.py`) and the export/verify flow
over a finished run (`artifacts.py`)."""

from kdforge.export.formats import FORMATS, ExportFormat

__all__ = ["FORMATS", "ExportFormat"]
