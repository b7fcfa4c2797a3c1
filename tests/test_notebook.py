"""The Colab quickstart notebook executes headlessly on the tiny presets, so it cannot rot."""
import os

import pytest

from helpers import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_colab_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXIDX_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("JAXIDX_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(REPO, "launch", "colab_quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute()
    assert os.path.exists(tmp_path / "curves.png")
