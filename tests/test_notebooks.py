"""The notebooks in notebooks/ run top to bottom, headless (nbclient), with tiny parameters: a
cell setting them is inserted after each notebook's cell tagged "parameters" (papermill's
convention), so a notebook cannot rot. Also: outputs are stripped in the repository.

To stay fast the shapes notebooks reuse a random tiny VAE run (`VAE_RUN`; VAE training has its own
tests) and the kernels share a JAX compilation cache, so the LoRA notebook's base training reuses
the quickstart's compiled step.

A notebook runs twice in the same folder (a user's second "Run all"): after the first run, the
cells that train or convert (RERUN) run again in the same kernel, finding their runs made (a
finished run's train() returns no history; the converted run is kept). Only those cells: the
others do not depend on what is already on disk, and the same kernel reuses the compiled code.

The test environment has vdit installed, so there cell 1 (Colab's clone and install) does nothing:
its other cases run it alone, with git, pip and the runtime simulated."""

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
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


# ---------------------------------------------------------------- the Colab install cell (cell 1)
URL_LINE = re.compile(r'^REPO_URL = "[^"]*"', re.M)
NOTEBOOK_NAMES = list(PARAMETERS)


def run_install_cell(name, cwd, monkeypatch, *, importable, installed, repo_url="https://x.org/v.git",
                     env=None, nvidia_smi=False, devices=(), calls=None):
    """Executes cell 1 of notebook `name` in the folder `cwd` with git and pip recorded, not run
    (the clone makes a checkout: a folder holding the package folder), and simulated: whether vdit
    is importable (find_spec) and installed (its metadata), the environment `env`, nvidia-smi on
    PATH and which of /dev's `devices` exist. `repo_url` None keeps the cell's placeholder.
    Returns the commands (also appended to `calls`) and sys.path as the cell left it (restored
    afterwards, as all the rest)."""
    source = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4).cells[1].source
    if repo_url is not None:
        source, count = URL_LINE.subn(f'REPO_URL = "{repo_url}"', source)
        assert count == 1, "cell 1 sets no REPO_URL"
    calls = [] if calls is None else calls

    def check_call(args, *rest, **kwargs):
        calls.append(list(args))
        if list(args[:2]) == ["git", "clone"]:
            os.makedirs(os.path.join(args[-1], "vdit"))
            open(os.path.join(args[-1], "vdit", "__init__.py"), "w").close()
        return 0

    real_find_spec, real_distribution = importlib.util.find_spec, importlib.metadata.distribution
    real_exists, real_which = os.path.exists, shutil.which

    def find_spec(module, *rest, **kwargs):
        return None if module == "vdit" and not importable else real_find_spec(module, *rest, **kwargs)

    def distribution(package):
        if package != "vdit":
            return real_distribution(package)
        if not installed:
            raise importlib.metadata.PackageNotFoundError(package)
        return object()

    monkeypatch.setattr(subprocess, "check_call", check_call)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(os.path, "exists", lambda p: str(p) in devices if str(p).startswith("/dev/")
                        else real_exists(p))
    monkeypatch.setattr(shutil, "which", lambda cmd, *rest, **kwargs: (
        ("/usr/bin/nvidia-smi" if nvidia_smi else None) if cmd == "nvidia-smi"
        else real_which(cmd, *rest, **kwargs)))
    for key in ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell's insert goes into this copy
    monkeypatch.chdir(cwd)
    exec(compile(source, f"{name}.ipynb cell 1", "exec"), {"__name__": "__main__"})
    return calls, list(sys.path)


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
@pytest.mark.parametrize("runtime, expected", [
    (dict(), []),                                                      # CPU
    (dict(nvidia_smi=True), ["jax[cuda12]"]),                          # GPU
    (dict(env={"TPU_ACCELERATOR_TYPE": "v5litepod-1"}), ["jax[tpu]"]),  # TPU
    (dict(devices={"/dev/vfio"}), ["jax[tpu]"]),                       # a TPU VM's device
    (dict(devices={"/dev/vfio"}, nvidia_smi=True), ["jax[cuda12]"]),   # a GPU host with vfio
], ids=["cpu", "gpu", "tpu", "tpu-vfio", "gpu-vfio"])
def test_install_cell_on_a_fresh_runtime(name, runtime, expected, tmp_path, monkeypatch):
    """A fresh Colab runtime (vdit neither importable nor installed): the cell clones into
    vdit-src (a checkout named vdit in Colab's working folder, which is on sys.path, would shadow
    the editable install after a restart), pip-installs it with the runtime's jax build, and puts
    the checkout first on sys.path (the running kernel has not read the install's .pth)."""
    calls, path = run_install_cell(name, tmp_path, monkeypatch, importable=False, installed=False,
                                   **runtime)
    src = os.path.join(os.path.realpath(tmp_path), "vdit-src")
    assert [c[:2] for c in calls] == [["git", "clone"], [sys.executable, "-m"]], calls
    assert calls[0][-2:] == ["https://x.org/v.git", src]
    pip = calls[1]
    assert pip[2:4] == ["pip", "install"] and pip[pip.index("-e") + 1] == src
    assert [a for a in pip if a.startswith("jax")] == expected
    assert path[0] == src and os.path.isfile(os.path.join(src, "vdit", "__init__.py"))


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
@pytest.mark.parametrize("installed", [True, False], ids=["restart", "interrupted-install"])
def test_install_cell_after_a_restart(name, installed, tmp_path, monkeypatch):
    """After a runtime restart (the checkout there, vdit installed and importable from it), the
    cell neither clones nor installs, and puts the checkout first on sys.path; a checkout whose
    install did not finish is installed again (never cloned again)."""
    src = os.path.join(os.path.realpath(tmp_path), "vdit-src")
    os.makedirs(os.path.join(src, "vdit"))
    open(os.path.join(src, "vdit", "__init__.py"), "w").close()
    calls, path = run_install_cell(name, tmp_path, monkeypatch, importable=True,
                                   installed=installed, repo_url=None)
    assert [c[2:4] for c in calls] == ([] if installed else [["pip", "install"]]), calls
    assert path[0] == src


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_install_cell_asks_for_repo_url(name, tmp_path, monkeypatch):
    """REPO_URL left as its placeholder on a fresh runtime: a ValueError saying to set it, before
    any git or pip."""
    calls = []
    with pytest.raises(ValueError, match="Set REPO_URL"):
        run_install_cell(name, tmp_path, monkeypatch, importable=False, installed=False,
                         repo_url=None, calls=calls)
    assert calls == [] and not os.listdir(tmp_path)


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_install_cell_does_nothing_where_vdit_is_installed(name, tmp_path, monkeypatch):
    """vdit importable from a normal install (a laptop clone after `pip install -e .`): the cell
    does nothing, even with REPO_URL still its placeholder."""
    before = list(sys.path)
    calls, path = run_install_cell(name, tmp_path, monkeypatch, importable=True, installed=True,
                                   repo_url=None)
    assert calls == [] and path == before and not os.listdir(tmp_path)
