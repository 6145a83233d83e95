"""launch/: the TPU VM and SLURM scripts print the expected gcloud / sbatch / srun commands in
--dry-run mode and execute nothing; bad input fails with a message; shellcheck is clean."""

import importlib.metadata
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TOOLS = ("gcloud", "sbatch", "srun", "scancel", "scontrol", "tar", "tail")


@pytest.fixture()
def env(tmp_path):
    """PATH with fake cluster tools that record any call: dry runs must not reach them."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in TOOLS:
        path = fake / tool
        path.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path}/called\nexit 1\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "SLURM_"))}
    environ["PATH"] = f"{fake}:{environ['PATH']}"
    yield environ
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()


def _run(env, script, *args, ok=True):
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def _commands(stdout):
    """The printed commands, parsed back into argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


# sbatch options of every SLURM job: it runs in this checkout, its spooled script told where
# launch/ is.
IN_CHECKOUT = [f"--chdir={ROOT}", f"--export=ALL,VDIT_LAUNCH_DIR={ROOT}/launch"]
TPU = ["--name", "vdit-test", "--zone", "us-east5-a"]


def test_tpu_vm_lifecycle_dry_run(env):
    out = _run(env, "tpu_vm.sh", "--dry-run", "up", *TPU, "--accelerator", "v5p-64", "--spot",
               "--config", "configs/wan2_1_t2v_14b.py", "--workdir", "gs://b/run", "--",
               "--config.mesh.sequence=4", "--config.data.note=it's").stdout
    create, tar, scp, install, train = _commands(out)
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vdit-test",
                      "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot",
                      "--zone=us-east5-a"]
    assert tar[:2] == ["tar", "-czf"] and "--exclude=./.venv" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert install[4:7] == ["ssh", "vdit-test", "--worker=all"]
    assert "uv pip install -q --python .venv/bin/python -e '.[gcs]' 'jax[tpu]'" in install[7]
    assert train[4:7] == ["ssh", "vdit-test", "--worker=all"]
    remote = shlex.split(train[7].removeprefix("--command="))
    start = remote.index("-m") + 1
    assert remote[start - 2:start + 9] == [
        ".venv/bin/python", "-m", "vdit", "train", "--config", "configs/wan2_1_t2v_14b.py",
        "--workdir", "gs://b/run", "--distributed", "on", "--config.mesh.sequence=4"]
    assert "--config.data.note=it's" in remote  # quoting survives two shells


def _worker_install(env, tmp_path, *args):
    """The remote command of `install`, run here in a stand-in worker home (the tarball unpacked
    by the real tar) with a fake python3 that records its calls: the image's python3 only
    installs uv, and uv makes the venv with the Python asked for."""
    install, = [c for c in _commands(_run(env, "tpu_vm.sh", "--dry-run", "install", *TPU,
                                          *args).stdout) if c[4:5] == ["ssh"]]
    home = tmp_path / "home"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pyproject.toml").write_text("x")
    home.mkdir()
    subprocess.run([shutil.which("tar"), "-czf", str(home / "vdit-src.tar.gz"), "-C",
                    str(tmp_path / "src"), "."], check=True, timeout=30)
    worker_bin = tmp_path / "worker_bin"
    worker_bin.mkdir()
    python3 = worker_bin / "python3"
    python3.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/python3_calls\n")
    python3.chmod(python3.stat().st_mode | stat.S_IEXEC)
    subprocess.run(["bash", "-c", install[7].removeprefix("--command=")], cwd=home, check=True,
                   env=dict(os.environ, HOME=str(home), PATH=f"{worker_bin}:{os.environ['PATH']}"),
                   timeout=30)
    assert (home / "vdit" / "pyproject.toml").is_file()
    return [line.split() for line in (tmp_path / "python3_calls").read_text().splitlines()]


def test_tpu_vm_install_makes_a_python_3_11_venv_with_uv(env, tmp_path):
    """The image's python3 (3.10 on v2-alpha-tpuv5) is too old for vdit: it installs uv, which
    makes .venv with Python 3.11 (--python / TPU_PYTHON another) and installs vdit into it."""
    calls = _worker_install(env, tmp_path)
    assert calls == [
        ["-m", "pip", "install", "-q", "-U", "--user", "uv"],
        ["-m", "uv", "venv", "-q", "--clear", "--seed", "--python", "3.11", ".venv"],
        ["-m", "uv", "pip", "install", "-q", "--python", ".venv/bin/python", "-e", ".[gcs]",
         "jax[tpu]"]]
    for args, environ in ((["--python", "3.12"], env), ([], dict(env, TPU_PYTHON="3.12"))):
        install = _commands(_run(environ, "tpu_vm.sh", "--dry-run", "install", *TPU,
                                 *args).stdout)[-1]
        assert "uv venv -q --clear --seed --python 3.12 .venv" in install[7]


def test_tpu_vm_sample_runs_on_every_worker(env):
    """`sample`: one multi-host `vdit sample` over the slice (the --mesh after `--` shards it),
    its own log; the prompt's quoting survives two shells."""
    sample, = _commands(_run(env, "tpu_vm.sh", "--dry-run", "sample", *TPU, "--workdir",
                             "gs://b/run", "--", "--mesh", "fsdp=8,sequence=4", "--prompt",
                             "a fox's run", "--out", "gs://b/fox.mp4").stdout)
    assert sample[4:7] == ["ssh", "vdit-test", "--worker=all"]
    remote = shlex.split(sample[7].removeprefix("--command="))
    start = remote.index("-m") + 1
    assert remote[start - 2:start + 12] == [
        ".venv/bin/python", "-m", "vdit", "sample", "--workdir", "gs://b/run", "--distributed",
        "on", "--mesh", "fsdp=8,sequence=4", "--prompt", "a fox's run", "--out", "gs://b/fox.mp4"]
    assert remote[start + 12:] == [">", "~/vdit-sample.log", "2>&1", "&"]


def test_tpu_vm_logs_delete_and_project(env):
    logs, = _commands(_run(env, "tpu_vm.sh", "logs", "--dry-run", *TPU, "--worker", "3").stdout)
    assert logs[4:7] == ["ssh", "vdit-test", "--worker=3"] and "tail" in logs[7]
    delete, = _commands(_run(env, "tpu_vm.sh", "--dry-run", "delete", *TPU, "--project",
                             "my-proj").stdout)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vdit-test", "--quiet",
                      "--zone=us-east5-a", "--project=my-proj"]
    env = dict(env, TPU_NAME="from-env", TPU_ZONE="europe-west4-a")
    delete, = _commands(_run(env, "tpu_vm.sh", "--dry-run", "delete").stdout)
    assert delete[5] == "from-env" and delete[-1] == "--zone=europe-west4-a"


@pytest.mark.parametrize("args,message", [
    (["create", "--zone", "z"], "--name is required"),
    (["create", "--name", "n"], "--zone is required"),
    (["train", *TPU], "--config is required"),
    (["train", *TPU, "--config", "c.py"], "--workdir is required"),
    (["sample", *TPU, "--", "--prompt", "p"], "--workdir is required"),
    ([*TPU], "a command is required"),
    (["create", "delete", *TPU], "two commands given"),
    (["create", *TPU, "--bogus"], "unknown argument '--bogus'"),
    # checked before the slice is created (a paid slice, then the install, then this error)
    (["up", *TPU, "--workdir", "gs://b/r"], "--config is required"),
    (["create", *TPU, "--project"], "--project needs a value"),
    (["install", *TPU, "--python"], "--python needs a value"),
])
def test_tpu_vm_bad_input(env, args, message):
    proc = _run(env, "tpu_vm.sh", "--dry-run", *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_slurm_submit_dry_run(env):
    out = _run(env, "slurm.sh", "--dry-run", "submit", "--nodes", "4", "--partition", "gpu",
               "--time", "48:00:00", "--config", "configs/wan2_1_t2v_14b.py", "--workdir",
               "/shared/run", "--", "--config.mesh.sequence=4").stdout
    sbatch, check, srun = _commands(out)
    assert sbatch[:5] == ["sbatch", "--nodes=4", "--gpus-per-node=8", "--partition=gpu",
                          "--time=48:00:00"]
    assert sbatch[5:7] == IN_CHECKOUT
    assert sbatch[7].endswith("launch/slurm_gpu.sbatch")
    assert sbatch[8:] == ["--config", "configs/wan2_1_t2v_14b.py", "--workdir", "/shared/run",
                          "--", "--config.mesh.sequence=4"]
    assert check[:2] == [os.path.join(ROOT, ".venv/bin/python"), "-c"]
    assert srun[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--export=ALL,XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"]
    task = shlex.split(srun[-1])
    assert task[1:] == [os.path.join(ROOT, ".venv/bin/python"), "-m", "vdit", "train",
                        "--config", "configs/wan2_1_t2v_14b.py", "--workdir", "/shared/run",
                        "--coordinator", "FIRST_NODE:8476", "--num_processes", "4",
                        "--process_id", "$SLURM_PROCID", "--config.mesh.sequence=4"]


def test_slurm_job_memory_fraction_and_gpu_check(env, tmp_path):
    """JAX may take 95% of each GPU (its default is 75%), unless the user set their own
    fraction; before srun the job stops when JAX finds no GPU (its CPU build)."""
    job = ["--dry-run", "--config", "c.py", "--workdir", "/w"]
    check, srun = _commands(_run(env, "slurm_gpu.sbatch", *job).stdout)
    assert "--export=ALL,XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in srun
    env_own = dict(env, XLA_PYTHON_CLIENT_MEM_FRACTION="0.9")
    srun = _commands(_run(env_own, "slurm_gpu.sbatch", *job).stdout)[-1]
    assert "--export=ALL,XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in srun
    # The printed check, run against a stand-in jax module that reports each backend.
    fake = tmp_path / "fake_jax"
    fake.mkdir()
    for backend, code in (("cpu", 1), ("gpu", 0)):
        (fake / "jax.py").write_text(f"def default_backend():\n    return {backend!r}\n")
        proc = subprocess.run([sys.executable, *check[1:]], capture_output=True, text=True,
                              env=dict(env, PYTHONPATH=str(fake)), timeout=30)
        assert proc.returncode == code, proc.stderr
        if code:
            assert "JAX finds no GPU (its CPU build?): run launch/slurm.sh install" in proc.stderr


def _job_from_spool(env, tmp_path, *args):
    """Submits from another folder (dry run), then runs the printed sbatch line as SLURM would:
    the script copied to a spool folder, run in --chdir with --export's variables."""
    submit_dir = tmp_path / "runs"
    submit_dir.mkdir(exist_ok=True)
    out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sh"), "--dry-run", *args], env=env,
                         cwd=submit_dir, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    sbatch = _commands(out.stdout)[0]
    at = next(i for i, w in enumerate(sbatch) if w.endswith(".sbatch"))
    options = dict(w[2:].split("=", 1) for w in sbatch[1:at])
    spool = tmp_path / "spool" / "slurm_script"
    spool.parent.mkdir(exist_ok=True)
    shutil.copy(sbatch[at] if os.path.isabs(sbatch[at]) else submit_dir / sbatch[at], spool)
    exported = dict(v.split("=", 1) for v in options.get("export", "").split(",") if "=" in v)
    job_env = dict(env, SLURM_SUBMIT_DIR=str(submit_dir), SLURM_NTASKS="2", **exported)
    job = subprocess.run(["bash", str(spool), "--dry-run", *sbatch[at + 1:]], env=job_env,
                         cwd=options.get("chdir", submit_dir), capture_output=True, text=True,
                         timeout=60)
    assert job.returncode == 0, job.stdout + job.stderr
    return options["chdir"], _commands(job.stdout)[-1], submit_dir


def test_slurm_jobs_run_from_a_spool_copy_submitted_elsewhere(env, tmp_path):
    """sbatch runs a copy of the script from its spool folder: submitted from outside the
    checkout, the job still finds launch/, runs in the checkout and sees the paths as given."""
    chdir, srun, submit_dir = _job_from_spool(
        env, tmp_path, "submit", "--nodes", "2", "--config", "configs/shapes_dit.py",
        "--workdir", "w")
    assert chdir == ROOT
    task = shlex.split(srun[-1])
    assert task[1] == os.path.join(ROOT, ".venv/bin/python")
    config = task[task.index("--config") + 1]
    assert os.path.isfile(os.path.join(chdir, config))  # the repo's configs/, run in the repo
    assert task[task.index("--workdir") + 1] == str(submit_dir / "w")  # where the user was
    chdir, task, submit_dir = _job_from_spool(
        env, tmp_path, "curate", "--shards", "2", "--input", "raw", "--output", "/o")
    assert chdir == ROOT and task[0] == os.path.join(ROOT, ".venv/bin/python")
    assert task[task.index("--input") + 1] == str(submit_dir / "raw")


def test_slurm_job_script_inside_an_allocation(env, tmp_path):
    """Under SLURM the job names the first node as coordinator (scontrol stubbed to answer)."""
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    env = dict(env, SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NTASKS="2")
    _, srun = _commands(_run(env, "slurm_gpu.sbatch", "--dry-run", "--config", "c.py",
                             "--workdir", "/w", "--port", "9000").stdout)
    assert "--coordinator gpu-node-07:9000 --num_processes 2" in srun[-1]


def test_slurm_logs_cancel_and_errors(env, tmp_path):
    # The job writes its log in the checkout (--chdir): `logs` reads it there from any folder.
    logs = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sh"), "--dry-run", "logs", "1234"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert _commands(logs.stdout) == [
        ["tail", "-n", "200", "-F", os.path.join(ROOT, "vdit-train-1234.log")]]
    cancel, = _commands(_run(env, "slurm.sh", "--dry-run", "cancel", "1234").stdout)
    assert cancel == ["scancel", "1234"]
    for args, message in ((["submit", "--config", "c.py"], "--workdir is required"),
                          (["submit", "--nodes", "x", "--config", "c", "--workdir", "w"],
                           "--nodes must be a positive integer"),
                          (["logs"], "a job id is required")):
        assert message in _run(env, "slurm.sh", "--dry-run", *args, ok=False).stderr
    proc = _run(env, "slurm_gpu.sbatch", "--config", "c.py", "--workdir", "/w", ok=False)
    assert "not inside a SLURM allocation" in proc.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck) - lint not run")
    scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH)
                     if f.endswith((".sh", ".sbatch")))
    proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_slurm_data_jobs_dry_run(env):
    """curate/encode as array jobs: task I runs `vdit ... --shard I --num-shards N`."""
    out = _run(env, "slurm.sh", "--dry-run", "encode", "--shards", "16", "--partition", "gpu",
               "--config", "configs/wan2_1_t2v_1_3b.py", "--workdir", "/shared/run", "--",
               "--config.encode.source=/shared/videos").stdout
    sbatch, task = _commands(out)
    assert sbatch[:4] == ["sbatch", "--array=0-15", "--gpus=1", "--partition=gpu"]
    assert sbatch[4:6] == IN_CHECKOUT
    assert sbatch[6].endswith("launch/slurm_data.sbatch")
    assert sbatch[7:] == ["encode", "--num-shards", "16", "--config", "configs/wan2_1_t2v_1_3b.py",
                          "--workdir", "/shared/run", "--", "--config.encode.source=/shared/videos"]
    assert task == [os.path.join(ROOT, ".venv/bin/python"), "-m", "vdit", "encode", "--config",
                    "configs/wan2_1_t2v_1_3b.py", "--workdir", "/shared/run", "--distributed",
                    "off", "--shard", "$SLURM_ARRAY_TASK_ID", "--num-shards", "16",
                    "--config.encode.source=/shared/videos"]
    sbatch, task = _commands(_run(env, "slurm.sh", "--dry-run", "curate", "--shards", "4",
                                  "--input", "/shared/raw", "--output", "/shared/clips").stdout)
    assert sbatch[1] == "--array=0-3" and not any(w.startswith("--gpus") for w in sbatch)
    assert task[3:] == ["curate", "--input", "/shared/raw", "--output", "/shared/clips",
                        "--distributed", "off", "--shard", "$SLURM_ARRAY_TASK_ID",
                        "--num-shards", "4"]
    logs, = _commands(_run(env, "slurm.sh", "--dry-run", "logs", "77_3").stdout)
    assert logs[-1] == os.path.join(ROOT, "vdit-data-77_3.log")


def test_slurm_data_task_inside_an_array(env):
    args = ["encode", "--num-shards", "4", "--config", "c.py", "--workdir", "/w"]
    task, = _commands(_run(dict(env, SLURM_ARRAY_TASK_ID="3"), "slurm_data.sbatch", "--dry-run",
                           *args).stdout)
    assert task[task.index("--shard") + 1] == "3"
    for environ, message in ((dict(env, SLURM_ARRAY_TASK_ID="4"),
                              "array task 4 is outside --num-shards 4"),
                             (env, "not inside a SLURM array task")):
        assert message in _run(environ, "slurm_data.sbatch", *args, ok=False).stderr


def test_slurm_install_adds_jax_cuda_build(env, tmp_path):
    """`install`: the CUDA plugin of the installed jax into the checkout's .venv (or --venv,
    made absolute like the job's paths); the extras it names are the installed jax's own."""
    install, = _commands(_run(env, "slurm.sh", "--dry-run", "install").stdout)
    assert install == [os.path.join(ROOT, ".venv/bin/python"), "-m", "pip", "install", "-q",
                       "jax[cuda12]"]
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sh"), "--dry-run", "install",
                           "--venv", "env", "--cuda", "13"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert _commands(proc.stdout) == [[str(tmp_path / "env" / "bin" / "python"), "-m", "pip",
                                       "install", "-q", "jax[cuda13]"]]
    extras = importlib.metadata.metadata("jax").get_all("Provides-Extra")
    assert {"cuda12", "cuda13"} <= set(extras), extras
    missing = _run(env, "slurm.sh", "install", "--venv", str(tmp_path / "none"), ok=False)
    assert f"no {tmp_path}/none/bin/python" in missing.stderr and not missing.stdout


@pytest.mark.parametrize("args,message", [
    (["install", "--cuda", "11"], "--cuda must be 12 or 13"),
    (["install", "--cuda"], "--cuda needs a value"),
    (["encode", "--shards", "x", "--config", "c", "--workdir", "w"],
     "--shards must be a positive integer"),
    (["encode", "--shards", "2", "--config", "c"], "--workdir is required"),
    (["curate", "--shards", "2", "--output", "o"], "--input is required"),
    (["encode", "--shards", "2", "--gpus", "x", "--config", "c", "--workdir", "w"],
     "--gpus must be a whole number"),
    (["submit", "--config", "c", "--workdir", "w", "--gpus-per-node", "x"],
     "--gpus-per-node must be a positive integer"),
    (["submit", "--config"], "--config needs a value"),
])
def test_slurm_data_bad_input(env, args, message):
    assert message in _run(env, "slurm.sh", "--dry-run", *args, ok=False).stderr


def test_tpu_vm_data_jobs_shard_by_worker_number(env, tmp_path):
    """Every worker runs the job with its own metadata worker number as --shard; the remote
    command, run here with a fake metadata server (curl) and python, shows it."""
    train, = _commands(_run(env, "tpu_vm.sh", "--dry-run", "encode", *TPU, "--config",
                            "configs/wan2_1_t2v_1_3b.py", "--workdir", "gs://b/run", "--",
                            "--config.encode.source=/mnt/videos").stdout)
    assert train[4:7] == ["ssh", "vdit-test", "--worker=all"]
    remote = train[7].removeprefix("--command=")
    home = tmp_path / "home"
    (home / "vdit" / ".venv" / "bin").mkdir(parents=True)
    python = home / "vdit" / ".venv" / "bin" / "python"
    python.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/ran\n")
    curl = tmp_path / "bin" / "curl"
    curl.write_text("#!/bin/sh\ncase \"$*\" in *agent-worker-number) echo 2 ;; "
                    "*) echo 'a:b:10.0.0.1,a:b:10.0.0.2,a:b:10.0.0.3' ;; esac\n")
    for tool in (python, curl):
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    subprocess.run(["bash", "-c", remote + " wait"], cwd=home, env=dict(env, HOME=str(home)),
                   check=True, timeout=30)
    assert (tmp_path / "ran").read_text().split() == [
        "-m", "vdit", "encode", "--config", "configs/wan2_1_t2v_1_3b.py", "--workdir",
        "gs://b/run", "--distributed", "off", "--shard", "2", "--num-shards", "3",
        "--config.encode.source=/mnt/videos"]
    curate, = _commands(_run(env, "tpu_vm.sh", "--dry-run", "curate", *TPU, "--input",
                             "/mnt/raw", "--output", "gs://b/clips").stdout)
    assert "vdit curate --input /mnt/raw --output gs://b/clips --distributed off" in curate[7]
    assert "--input is required" in _run(env, "tpu_vm.sh", "--dry-run", "curate", *TPU,
                                         ok=False).stderr


def test_tpu_vm_install_tarball_keeps_the_runs_package(env, tmp_path):
    """The tar command `install` prints, run here on a stand-in checkout: the top-level runs/,
    weights/ (tens of GB of diffusers folders: weights go to the bucket), demo_out/ and .venv/
    stay out, the vdit.runs package (vdit/runs/) and the rest go in."""
    tar, = [c for c in _commands(_run(env, "tpu_vm.sh", "--dry-run", "install", *TPU).stdout)
            if c[0] == "tar"]
    root = tmp_path / "checkout"
    for path in ("vdit/runs/__init__.py", "vdit/__init__.py", "runs/demo/log.txt",
                 "demo_out/a.mp4", ".venv/bin/python", "vdit/__pycache__/x.pyc",
                 "vdit.egg-info/PKG-INFO", "configs/demo_out/keep.py",
                 "weights/Wan2.1-T2V-14B-Diffusers/vae/model.safetensors"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    tar[0] = shutil.which("tar")  # the real one (the fixture's PATH fakes it)
    tar[tar.index("-czf") + 1] = str(tmp_path / "src.tar.gz")
    tar[tar.index("-C") + 1] = str(root)
    subprocess.run(tar, check=True, timeout=30)
    listing = subprocess.run([shutil.which("tar"), "-tzf", str(tmp_path / "src.tar.gz")],
                             check=True, capture_output=True, text=True).stdout.split()
    names = {name.removeprefix("./").rstrip("/") for name in listing}
    assert {"vdit/runs/__init__.py", "vdit/__init__.py", "configs/demo_out/keep.py"} <= names
    assert not names & {"runs", "demo_out", ".venv", "weights", "vdit/__pycache__",
                        "vdit.egg-info"}
