"""The notebooks in notebooks/ run top to bottom, headless (nbclient), with tiny parameters: a
cell setting them is inserted after each notebook's cell tagged "parameters" (papermill's
convention), so a notebook cannot rot. Also: outputs are stripped in the repository.

To stay fast the shapes notebooks reuse a random tiny VAE run (`VAE_RUN`; VAE training has its own
tests) and the kernels share a JAX compilation cache, so the LoRA notebook's base training reuses
the quickstart's compiled step.

A notebook runs twice in the same folder (a user's second "Run all"): after the first run, the
cells that train or convert (RERUN) run again in the same kernel, finding their runs made (a
finished run's train() returns no history; the converted run is kept). Only those cells: the
others do not depend on what is already on disk, and the same kernel reuses the compiled code."""

import os
import re
import time

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
import pytest
from flax.core import meta
from nbclient import NotebookClient
from test_train import TINY

from vdit.config import CONFIG_DIR, load_config
from vdit.models.vae_config import vae_from_config
from vdit.runs import checkpoint

ROOT = os.path.join(os.path.dirname(__file__), "..")
NOTEBOOKS = os.path.join(ROOT, "notebooks")
TINY_VAE = ["--config.vae.base_dim=8", "--config.vae.num_res_blocks=0", "--config.vae_train.batch_size=2",
            "--config.vae_train.shapes=[(1, 16, 16), (5, 16, 16)]",
            "--config.vae_train.eval_examples=2", "--config.train.progress=False",
            "--config.train.tensorboard=False", "--config.checkpoint.async_save=False",
            "--config.optim.warmup_steps=0"]
# The trainer tests' tiny DiT (word-level captions of the synthetic world), 5-frame 16x16 clips.
TINY_DIT = [o for o in TINY if not o.startswith(("--config.train.steps", "--config.text.kind"))] + [
    "--config.vae.base_dim=8", "--config.vae.num_res_blocks=0", "--config.encode.shapes=[(5, 16, 16)]",
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
RERUN = re.compile(r"\b(train|convert)\(")  # the cells a second run finds their work done for


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


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A random tiny VAE run (TINY_VAE's shapes) and a JAX compilation cache for the kernels."""
    vae_dir = str(tmp_path_factory.mktemp("vae"))
    config = load_config(os.path.join(CONFIG_DIR, "shapes_vae.py"), TINY_VAE)
    vae = vae_from_config(config.vae)
    shapes = jax.eval_shape(lambda: meta.unbox(vae.init(jax.random.key(0),
                                                        jnp.zeros((1, 1, 16, 16, 3))))["params"])
    rng = np.random.default_rng(0)  # random weights without compiling an init
    params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    manager = checkpoint.make_manager(vae_dir, config.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": params}, config)
    manager.wait_until_finished()
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return {"VAE_RUN": vae_dir, "cache": cache, "runs": {}}


@pytest.mark.parametrize("name", ["quickstart", "finetune_lora", "wan_inference"])
def test_notebook_runs_top_to_bottom(name, tmp_path, kernel_env, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", kernel_env["cache"])
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    values = dict(PARAMETERS[name])
    if name != "wan_inference":
        values["VAE_RUN"] = kernel_env["VAE_RUN"]
    if name == "finetune_lora" and "quickstart" in kernel_env["runs"]:
        values["BASE_RUN"] = kernel_env["runs"]["quickstart"]  # its DiT: no second base training
    path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:  # stripped in the repository
        assert cell.cell_type != "code" or (not cell.outputs and cell.execution_count is None), name
    assert "Runtime" in book.cells[1].source and "pip" in book.cells[1].source  # the Colab cell
    start = time.perf_counter()
    client = NotebookClient(with_parameters(book, values), timeout=600,
                            kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(cleanup_kc=False)  # the kernel stays for the second run
    print(f"{name}: {time.perf_counter() - start:.1f}s; cells: {cell_seconds(book)}")
    start = time.perf_counter()
    with client.setup_kernel():  # the same kernel, shut down on leaving
        rerun = [i for i, c in enumerate(book.cells) if c.cell_type == "code" and
                 RERUN.search(c.source)]
        assert rerun, name
        for index in rerun:  # raises CellExecutionError naming the cell on an error
            client.execute_cell(book.cells[index], index)
    print(f"{name}: rerun of cells {rerun} {time.perf_counter() - start:.1f}s")
    if name == "quickstart":
        kernel_env["runs"][name] = str(tmp_path / "quickstart_runs" / "dit")
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    html = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
            if "text/html" in o.get("data", {})]
    assert html and "data:image/gif;base64" in html[-1]["data"]["text/html"]  # videos inline


def test_lora_notebook_caption_is_in_the_text_encoders_words():
    """The LoRA notebook's caption (PROMPT, written beside its videos) has only words the shapes
    word-level text encoder knows: another word would be read as <unk>."""
    from vdit.models.tokenizers import WordTokenizer

    book = nbformat.read(os.path.join(NOTEBOOKS, "finetune_lora.ipynb"), as_version=4)
    cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
    values = {}
    exec(cell.source, values)  # plain assignments
    vocab = load_config(os.path.join(CONFIG_DIR, "shapes_lora.py"), []).text.vocab
    assert WordTokenizer(list(vocab), 64).unknown_words(values["PROMPT"]) == []
