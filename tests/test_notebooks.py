"""The notebooks in notebooks/ run top to bottom, headless (nbclient), with tiny parameters: a
cell setting them is inserted after each notebook's cell tagged "parameters" (papermill's
convention), so a notebook cannot rot. Also: outputs are stripped in the repository."""

import os
import time

import nbformat
import pytest
from nbclient import NotebookClient
from test_train import TINY

ROOT = os.path.join(os.path.dirname(__file__), "..")
NOTEBOOKS = os.path.join(ROOT, "notebooks")
TINY_VAE = ["--config.vae.base_dim=8", "--config.vae_train.batch_size=2",
            "--config.vae_train.shapes=[(1, 16, 16), (5, 16, 16)]",
            "--config.vae_train.eval_examples=2", "--config.train.progress=False",
            "--config.train.tensorboard=False", "--config.checkpoint.async_save=False",
            "--config.optim.warmup_steps=0"]
# The trainer tests' tiny DiT (word-level captions of the synthetic world), 5-frame 16x16 clips.
TINY_DIT = [o for o in TINY if not o.startswith(("--config.train.steps", "--config.text.kind"))] + [
    "--config.vae.base_dim=8", "--config.encode.shapes=[(5, 16, 16)]",
    "--config.encode.shape_weights=[1.0]", "--config.encode.batch_size=4",
    "--config.encode.num_shards=1", "--config.sample.frames=5", "--config.sample.height=16",
    "--config.sample.width=16"]
PARAMETERS = {
    "quickstart": dict(VAE_STEPS=2, DIT_STEPS=2, NUM_EXAMPLES=8, SAMPLE_STEPS=2, NUM_SAMPLES=2,
                       VAE_OVERRIDES=TINY_VAE, DIT_OVERRIDES=TINY_DIT),
    "finetune_lora": dict(BASE_STEPS=2, LORA_STEPS=2, VAE_STEPS=2, SAMPLE_STEPS=2,
                          VAE_OVERRIDES=TINY_VAE,
                          DIT_OVERRIDES=TINY_DIT + ["--config.encode.num_examples=8"]),
    "wan_inference": dict(FRAMES=5, HEIGHT=16, WIDTH=16, STEPS=2),
}


def with_parameters(book, values: dict):
    """A copy of `book` with a cell setting `values` right after its "parameters" cell."""
    index = next((i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])),
                 None)
    assert index is not None, "the notebook has no cell tagged 'parameters'"
    names = set()
    for line in book.cells[index].source.splitlines():
        if "=" in line and not line.startswith("#"):
            names.update(n.strip() for n in line.split("=")[0].split(","))
    unknown = set(values) - names
    assert not unknown, f"parameters {sorted(unknown)} are not in the parameters cell"
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    book.cells.insert(index + 1, cell)
    return book


def cell_seconds(book) -> list[float]:
    """Seconds per executed code cell (nbclient records the kernel's timestamps)."""
    from datetime import datetime

    out = []
    for cell in book.cells:
        times = cell.metadata.get("execution", {})
        if "iopub.execute_input" in times and "shell.execute_reply" in times:
            t0, t1 = (datetime.fromisoformat(times[k].replace("Z", "+00:00"))
                      for k in ("iopub.execute_input", "shell.execute_reply"))
            out.append(round((t1 - t0).total_seconds(), 1))
    return out


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_runs_top_to_bottom(name, tmp_path):
    path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:  # stripped in the repository
        assert cell.cell_type != "code" or (not cell.outputs and cell.execution_count is None), name
    assert "Runtime" in book.cells[1].source and "pip" in book.cells[1].source  # the Colab cell
    start = time.perf_counter()
    client = NotebookClient(with_parameters(book, PARAMETERS[name]), timeout=600,
                            kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    print(f"{name}: {time.perf_counter() - start:.1f}s; cells: {cell_seconds(book)}")
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    html = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
            if "text/html" in o.get("data", {})]
    assert html and "data:image/gif;base64" in html[-1]["data"]["text/html"]  # videos inline
