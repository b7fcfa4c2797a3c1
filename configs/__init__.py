"""jaxidx presets, one module per method (`get_config(arg)`, and `auto(data)` sized from a data set).

Installed as the package `jaxidx.configs` (setup.py's package_dir), so `jaxidx.fit("irli:bibtex", ...)`
works from a wheel; the command line still takes `--config=configs/irli.py:bibtex`."""
