"""The command as users run it, in subprocesses: kill -9 + --resume (local and moto S3),
S3 errors before any model loading, 8 forced CPU devices, 2 jax.distributed processes and
`mup extract`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from _support.extract import LAYERS, assert_same_store, cli_env, run_cli, store_dirs
from _support.s3 import moto_process
from _support.servers import free_port

SHARD = "256"  # tokens per shard: ~80 shards over the big set, so a kill lands mid-run


def _args(model, data, out, *extra):
    return ["--model", model, "--dataset", data, "--out", out, "--layers", LAYERS,
            "--batch-tokens", "128", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def baseline(tiny_model, big_path, tmp_path_factory):
    """One uninterrupted single-device run of the big set with small shards (float32)."""
    cwd = tmp_path_factory.mktemp("baseline")
    out = cwd / "out"
    done = run_cli(_args(tiny_model, big_path, out, "--dtype", "float32"), cwd,
                   env=cli_env(MUP_EXTRACT_SHARD_TOKENS=SHARD))  # fmt: skip
    assert done.returncode == 0, done.stderr
    (url,) = store_dirs(out)
    return str(url)


def _done_count(url: str) -> tuple[int, int]:
    from mup.store._io import open_array as _open_array
    from mup.store._location import parse_location

    try:
        done = _open_array(parse_location(url).kvstore("done")).read().result()
    except Exception:  # noqa: BLE001 (not created yet)
        return 0, 1
    return int(done.sum()), int(done.size)


def _kill_then_resume(tiny_model, big_path, out, url_of, env, cwd):
    args = _args(tiny_model, big_path, out, "--dtype", "float32")
    proc = subprocess.Popen([sys.executable, "-m", "mup.extract", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while True:
            url = url_of()
            if url and _done_count(url)[0] >= 1:
                break
            assert proc.poll() is None, f"finished before a kill: {proc.communicate()}"
            assert time.monotonic() < deadline, "no shard became durable in 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done, total = _done_count(url)
    assert 1 <= done < total, f"killed with {done}/{total} shards done: not mid-run"
    again = run_cli(args, cwd, env=env)
    assert again.returncode == 1 and "--resume" in again.stderr  # incomplete: refuse plainly
    resumed = run_cli([*args, "--resume"], cwd, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "[resume]" in resumed.stdout
    return url


@pytest.mark.slow
def test_kill_and_resume_local(tiny_model, big_path, baseline, tmp_path):
    out = tmp_path / "out"
    env = cli_env(MUP_EXTRACT_SHARD_TOKENS=SHARD)

    def url_of():
        dirs = store_dirs(out)
        return str(dirs[0]) if dirs else None

    url = _kill_then_resume(tiny_model, big_path, out, url_of, env, tmp_path)
    assert_same_store(url, baseline)


@pytest.mark.slow
def test_kill9_right_after_the_group_metadata_appears(tiny_model, mini_path, tmp_path):
    """The issue's window: kill -9 just after the group zarr.json is written. --resume then
    creates the store again (it held nothing yet) and equals an uninterrupted run."""
    from mup.store._create import FAIL_AFTER_ENV

    args = [*_args(tiny_model, mini_path, tmp_path / "out", "--dtype", "float32"), "--limit", "8"]
    clean = run_cli([*_args(tiny_model, mini_path, tmp_path / "clean", "--dtype", "float32"),
                     "--limit", "8"], tmp_path)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    killed = run_cli(args, tmp_path, env=cli_env(**{FAIL_AFTER_ENV: "zarr.json:kill"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (url,) = store_dirs(tmp_path / "out")
    assert not (url / "offsets").exists()  # killed inside creation
    resumed = run_cli([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "[recreate]" in resumed.stdout
    (want,) = store_dirs(tmp_path / "clean")
    assert_same_store(str(url), str(want))


@pytest.mark.s3
@pytest.mark.slow
def test_kill_and_resume_s3(tiny_model, big_path, baseline, tmp_path, moto_endpoint, s3_bucket):
    import boto3

    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    s3 = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "test",
          "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    env = {k: v for k, v in cli_env().items() if not k.startswith(("AWS_", "R2_"))}
    env.update(s3, MUP_EXTRACT_SHARD_TOKENS=SHARD)
    client = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")  # fmt: skip

    def url_of():
        listed = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "/")
        for item in listed.get("Contents", []):
            parts = item["Key"].split("/")  # prefix / model / store / zarr.json
            if len(parts) == 4 and parts[3] == "zarr.json":
                return f"s3://{s3_bucket}/{'/'.join(parts[:3])}"
        return None

    old = {k: os.environ.get(k) for k in s3}
    os.environ.update(s3)  # this process reads the S3 store through the same variables
    try:
        out = f"s3://{s3_bucket}/{prefix}"
        url = _kill_then_resume(tiny_model, big_path, out, url_of, env, tmp_path)
        assert_same_store(url, baseline)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_s3_errors_before_model_loading(tiny_model, mini_path, tmp_path, moto_endpoint,
                                        s3_bucket):  # fmt: skip
    base = {k: v for k, v in cli_env().items() if not k.startswith(("AWS_", "R2_"))}
    s3 = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "test",
          "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    # Missing bucket.
    cases = [
        ({**base, **s3}, f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x", "bucket"),
        # Unreachable endpoint (nothing listens on the port).
        ({**base, **s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
         f"s3://{s3_bucket}/x", ""),
    ]  # fmt: skip
    for env, out, word in cases:
        started = time.monotonic()
        got = run_cli(_args(tiny_model, mini_path, out), tmp_path, env=env, timeout=120)
        assert got.returncode == 1, got.stderr
        lines = [line for line in got.stderr.splitlines() if line.startswith("mup.extract: error")]
        assert len(lines) == 1 and word in lines[0].lower(), got.stderr
        assert "Traceback" not in got.stderr
        # The model is never loaded: nothing was planned or printed.
        assert "records" not in got.stdout, got.stdout
        assert time.monotonic() - started < 90


@pytest.mark.s3
@pytest.mark.slow
def test_endpoint_dies_mid_run(tiny_model, mini_path, tmp_path):
    """The S3 server goes away once a shard is durable: the retries (--s3-retries 1) are shown,
    then one error line, well before tensorstore's silent 15 minutes."""
    import boto3

    base = {k: v for k, v in cli_env().items() if not k.startswith(("AWS_", "R2_"))}
    with moto_process() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                              aws_secret_access_key="test", region_name="us-east-1")  # fmt: skip
        client.create_bucket(Bucket="dies")
        env = {**base, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "MUP_EXTRACT_SHARD_TOKENS": SHARD}  # fmt: skip
        args = _args(tiny_model, mini_path, "s3://dies/out", "--s3-retries", "1")
        proc = subprocess.Popen([sys.executable, "-m", "mup.extract", *map(str, args)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 240
        while not any("/done/c/" in o["Key"] for o in
                      client.list_objects_v2(Bucket="dies").get("Contents", [])):  # fmt: skip
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard became durable in 240 s"
            time.sleep(0.05)
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert time.monotonic() - started < 60
    retries = [line for line in err.splitlines() if "retry 1 of 1 in 1 s" in line]
    assert retries and all(line.startswith("mup.extract: writing shard ") for line in retries)
    errors = [line for line in err.splitlines() if line.startswith("mup.extract: error")]
    assert len(errors) == 1 and "failed after 1 retries" in errors[0], err
    assert "Traceback" not in err


def test_wrong_credentials(tiny_model, mini_path, tmp_path):
    base = {k: v for k, v in cli_env().items() if not k.startswith(("AWS_", "R2_"))}
    # moto checks signatures once INITIAL_NO_AUTH_ACTION_COUNT requests have passed.
    with moto_process({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        env = {**base, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "wrong",
               "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        got = run_cli(_args(tiny_model, mini_path, "s3://any-bucket/x"), tmp_path, env=env)
    assert got.returncode == 1, got.stderr
    lines = [line for line in got.stderr.splitlines() if line.startswith("mup.extract: error")]
    assert len(lines) == 1 and "Traceback" not in got.stderr, got.stderr
    assert "records" not in got.stdout


@pytest.mark.slow
def test_eight_devices_and_model_parallel(tiny_model, big_path, baseline, tmp_path):
    env = cli_env(MUP_EXTRACT_SHARD_TOKENS=SHARD,
                  XLA_FLAGS="--xla_force_host_platform_device_count=8")  # fmt: skip
    for extra in ([], ["--model-parallel", "2"]):
        out = tmp_path / f"out{len(extra)}"
        got = run_cli([*_args(tiny_model, big_path, out, "--dtype", "float32"), *extra],
                      tmp_path, env=env)  # fmt: skip
        assert got.returncode == 0, got.stderr
        (url,) = store_dirs(out)
        # Sharded over 8 devices each device runs B/8 rows: XLA:CPU picks other kernels for
        # those shapes, so float32 sums differ in the last bits (measured: 2.2e-8 absolute on
        # values ~0.03, 6.4e-7 relative on values ~2). Everything else (ids, tokens, masks,
        # done flags, attributes) is identical.
        assert_same_store(str(url), baseline, layer_atol=1e-6)


@pytest.mark.slow
def test_two_processes(tiny_model, big_path, baseline, tmp_path):
    out = tmp_path / "out"
    port = free_port()
    env = cli_env(MUP_EXTRACT_SHARD_TOKENS=SHARD)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mup.extract",
                *map(str, _args(tiny_model, big_path, out, "--dtype", "float32")),
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
    (url,) = store_dirs(out)
    assert_same_store(str(url), baseline)


@pytest.mark.slow
def test_console_script_is_the_module(tiny_model, mini_path, tmp_path):
    args = _args(tiny_model, mini_path, tmp_path / "out", "--limit", "4")
    via_module = run_cli(args, tmp_path)
    assert via_module.returncode == 0, via_module.stderr
    via_cli = run_cli(["extract", *args], tmp_path, module="mup.cli")
    assert via_cli.returncode == 0, via_cli.stderr
    assert "nothing to do" in via_cli.stdout  # same job, same content key, same store
    # Same plan line, same store (the module's run created it, the subcommand found it).
    first, second = via_module.stdout.splitlines(), via_cli.stdout.splitlines()
    assert first[0] == second[0]
    assert first[1].replace("[new]", "[complete]") == second[1]
    help_ = run_cli(["extract", "--help"], tmp_path, module="mup.cli")
    assert help_.returncode == 0 and "--batch-tokens" in help_.stdout
