"""GPU claiming: each concurrent job gets its own device; a killed job releases its claim."""

import subprocess
import sys
import textwrap

import pytest

from stages.devices import claim_gpu, claimed_device, visible_device_ids


@pytest.mark.parametrize("env, count, expected", [
    (None, 0, []),
    (None, 3, ["0", "1", "2"]),
    ("2,5", 2, ["2", "5"]),
    (" 3 , 1 ,", 2, ["3", "1"]),
    ("GPU-aaaa,GPU-bbbb", 2, ["GPU-aaaa", "GPU-bbbb"]),
    ("0,1,2,3", 2, ["0", "1"]),
])
def test_visible_device_ids(env, count, expected):
    assert visible_device_ids(env, count) == expected


def test_concurrent_claims_get_distinct_devices(tmp_path):
    first_index, first = claim_gpu(["4", "7"], tmp_path)
    second_index, second = claim_gpu(["4", "7"], tmp_path)
    assert {first_index, second_index} == {0, 1}
    with pytest.raises(TimeoutError, match="stayed locked"):
        claim_gpu(["4", "7"], tmp_path, timeout_s=0.2, poll_s=0.05)
    first.release()
    third_index, third = claim_gpu(["4", "7"], tmp_path, timeout_s=1)
    assert third_index == first_index
    second.release()
    third.release()


def test_killed_job_releases_its_claim(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from stages.devices import claim_gpu
        index, lock = claim_gpu(["0"], {str(tmp_path)!r})
        print(index, flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        with pytest.raises(TimeoutError):
            claim_gpu(["0"], tmp_path, timeout_s=0.2, poll_s=0.05)
        holder.kill()
        holder.wait()
        index, lock = claim_gpu(["0"], tmp_path, timeout_s=5, poll_s=0.05)
        assert index == 0
        lock.release()
    finally:
        holder.kill()


def test_without_cuda_the_job_runs_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with claimed_device() as device:
        assert device == "cpu"
    with claimed_device("cuda:3") as device:
        assert device == "cuda:3"


@pytest.mark.gpu
def test_claim_on_a_cuda_machine(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with claimed_device(lock_dir=tmp_path) as device:
        assert device.startswith("cuda:")
        assert torch.zeros(1, device=device).device.type == "cuda"
