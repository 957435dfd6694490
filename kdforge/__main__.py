from kdforge.cli import app

app(prog_name="kdforge")
