"""GPU claiming: each concurrent job gets its own devices (one, or N at once, all or nothing); a
killed job releases its claim."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from stages.devices import claim_gpus, claimed_device, claimed_devices, visible_device_ids


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


def release(locks):
    for lock in locks:
        lock.release()


def test_concurrent_claims_get_distinct_devices(tmp_path):
    first_indices, first = claim_gpus(["4", "7"], tmp_path)
    second_indices, second = claim_gpus(["4", "7"], tmp_path)
    assert sorted(first_indices + second_indices) == [0, 1]
    with pytest.raises(TimeoutError, match="stayed locked"):
        claim_gpus(["4", "7"], tmp_path, timeout_s=0.2, poll_s=0.05)
    release(first)
    third_indices, third = claim_gpus(["4", "7"], tmp_path, timeout_s=1)
    assert third_indices == first_indices
    release(second + third)


def test_a_claim_of_several_devices_takes_free_ones_together(tmp_path):
    ids = ["3", "5", "6", "7"]
    single, single_locks = claim_gpus(ids, tmp_path)                       # another job holds "3"
    pair, pair_locks = claim_gpus(ids, tmp_path, count=2)
    assert single == [0] and pair == [1, 2]
    with pytest.raises(TimeoutError, match="2 free GPUs at once"):          # only "7" is left
        claim_gpus(ids, tmp_path, count=2, timeout_s=0.2, poll_s=0.05)
    last, last_locks = claim_gpus(ids, tmp_path, timeout_s=0.2, poll_s=0.05)
    assert last == [3], "the failed claim of two must not keep the one free device"
    release(single_locks + pair_locks + last_locks)
    with pytest.raises(ValueError, match="cannot claim 5"):
        claim_gpus(ids, tmp_path, count=5)
    with pytest.raises(ValueError, match="cannot claim 0"):
        claim_gpus(ids, tmp_path, count=0)


def test_a_waiting_claim_holds_nothing_while_it_waits(tmp_path):
    """A job waiting for two devices while another holds one of them does not sit on the free one:
    a third job can claim it meanwhile, and the waiting job gets both once both are free."""
    ids = ["a", "b"]
    _, held_b = claim_gpus(["b"], tmp_path)
    waiter: dict = {}

    def wait_for_both():
        waiter["indices"], waiter["locks"] = claim_gpus(ids, tmp_path, count=2, timeout_s=20, poll_s=0.02)

    thread = threading.Thread(target=wait_for_both)
    thread.start()
    time.sleep(0.2)
    _, held_a = claim_gpus(["a"], tmp_path, timeout_s=5, poll_s=0.01)
    assert thread.is_alive()
    release(held_b)
    time.sleep(0.2)
    assert thread.is_alive(), "it must not get 'b' alone, nor steal 'a'"
    release(held_a)
    thread.join(timeout=10)
    assert not thread.is_alive() and waiter["indices"] == [0, 1]
    release(waiter["locks"])


def test_claimants_that_each_hold_part_of_what_they_need_do_not_deadlock(tmp_path):
    """Three jobs each want 2 of 3 devices and start together, so each may first grab one device. A
    claim that waited while holding its first device would deadlock here; all three must finish."""
    ids = ["0", "1", "2"]
    start = threading.Barrier(3)
    finished, errors = [], []

    def job(name):
        try:
            start.wait()
            indices, locks = claim_gpus(ids, tmp_path, count=2, timeout_s=30, poll_s=0.01)
            time.sleep(0.05)
            release(locks)
            finished.append((name, indices))
        except Exception as exc:  # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(name,)) for name in "xyz"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=40)
    assert not errors and len(finished) == 3, (errors, finished)
    assert all(len(indices) == 2 for _, indices in finished)


def test_killed_job_releases_its_claim(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from stages.devices import claim_gpus
        indices, locks = claim_gpus(["0", "1"], {str(tmp_path)!r}, count=2)
        print(indices, flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "[0, 1]"
        with pytest.raises(TimeoutError):
            claim_gpus(["0", "1"], tmp_path, timeout_s=0.2, poll_s=0.05)
        holder.kill()
        holder.wait()
        indices, locks = claim_gpus(["0", "1"], tmp_path, count=2, timeout_s=5, poll_s=0.05)
        assert indices == [0, 1]
        release(locks)
    finally:
        holder.kill()


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on a node with 4 visible GPUs (physical ids 3, 5, 6, 7); set_device recorded."""
    import torch

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    return current


def test_claimed_devices_locks_as_many_devices_as_asked(tmp_path, fake_cuda):
    with claimed_devices(2, lock_dir=tmp_path) as first, claimed_devices(1, lock_dir=tmp_path) as second:
        assert first == ["cuda:0", "cuda:1"] and second == ["cuda:2"]
        assert fake_cuda == [0, 2]
        with claimed_devices(1, lock_dir=tmp_path) as third:
            assert third == ["cuda:3"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"gpu-{i}.lock" for i in (3, 5, 6, 7)]
    with claimed_devices(2, lock_dir=tmp_path) as again:                 # released on exit
        assert again == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="needs 5 GPUs but sees 4"), claimed_devices(5, lock_dir=tmp_path):
        pass


def test_a_job_that_asked_for_no_gpu_runs_on_cpu_without_claiming(tmp_path, fake_cuda):
    """gpu=0 (config cluster.request_gpus false): the CPU, even where CUDA devices are visible."""
    with claimed_devices(0, lock_dir=tmp_path) as devices:
        assert devices == ["cpu"]
    assert not list(tmp_path.iterdir()) and fake_cuda == []
    with pytest.raises(ValueError, match="cannot ask for -1 GPUs"), claimed_devices(-1, lock_dir=tmp_path):
        pass


def test_claimed_devices_takes_exactly_what_is_visible_without_locks(tmp_path, fake_cuda, monkeypatch):
    """Slurm (or a node with exactly N GPUs): the N visible devices are the job's own."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,2")
    with claimed_devices(2, lock_dir=tmp_path) as devices:
        assert devices == ["cuda:0", "cuda:1"]
    with claimed_device(lock_dir=tmp_path) as device:                      # one of two: claimed
        assert device == "cuda:0"
    assert [path.name for path in tmp_path.iterdir()] == ["gpu-6.lock"]
    assert fake_cuda == [0]


def test_without_cuda_the_job_runs_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with claimed_device() as device:
        assert device == "cpu"
    with claimed_device("cuda:3") as device:
        assert device == "cuda:3"
    with claimed_devices(2) as devices:
        assert devices == ["cpu"]


@pytest.mark.gpu
def test_claim_on_a_cuda_machine(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with claimed_device(lock_dir=tmp_path) as device:
        assert device.startswith("cuda:")
        assert torch.zeros(1, device=device).device.type == "cuda"
