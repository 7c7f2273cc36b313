"""Engine checkpoint store: a checkpoint counts only once its completion record matches (no Ray,
no DeepSpeed: files stand in for DeepSpeed's)."""

import os

from stages.engine.checkpoints import CheckpointStore, find_checkpoint, tag_for


def write_checkpoint(store: CheckpointStore, step: int, complete: bool = True) -> str:
    tag = tag_for(step)
    d = os.path.join(store.save_dir(), tag)
    os.makedirs(d, exist_ok=True)
    for name, size in (("mp_rank_00_model_states.pt", 100), ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 50),
                       ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 50)):
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"x" * size)
    if complete:
        store.complete(tag, {"step": step, "world": 2, "zero_stage": 2})
    return d


def test_only_checkpoints_with_a_matching_record_count(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    write_checkpoint(store, 4)
    write_checkpoint(store, 8, complete=False)  # killed before the record
    found, rejected = store.latest()
    assert found.record["step"] == 4 and found.uri.endswith("checkpoints/step00000004")
    assert rejected == [(store.uri("step00000008"), "no completion record (the write did not finish)")]


def test_a_truncated_or_missing_shard_is_rejected_with_the_file_named(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    write_checkpoint(store, 4)
    d = write_checkpoint(store, 8)
    with open(os.path.join(d, "zero_pp_rank_1_mp_rank_00_optim_states.pt"), "wb") as f:
        f.write(b"x" * 10)  # a partial rewrite
    found, rejected = store.latest()
    assert found.record["step"] == 4
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt has 10 bytes, the record says 50" in rejected[0][1]
    with open(os.path.join(d, "zero_pp_rank_1_mp_rank_00_optim_states.pt"), "wb") as f:
        f.write(b"x" * 50)
    assert store.verify("step00000008")[0] is not None
    os.remove(os.path.join(d, "mp_rank_00_model_states.pt"))
    assert store.verify("step00000008")[1] == "mp_rank_00_model_states.pt is missing"


def test_a_torn_record_does_not_count(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    d = write_checkpoint(store, 4)
    with open(os.path.join(d, "COMPLETE.json"), "w") as f:
        f.write('{"step": 4, "fil')
    assert store.latest()[0] is None
    assert store.verify("step00000004")[1].startswith("unreadable completion record")


def test_prune_keeps_the_newest_complete_ones_and_never_the_only_good_one(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    for step in (2, 4, 6):
        write_checkpoint(store, step)
    write_checkpoint(store, 3, complete=False)
    write_checkpoint(store, 8, complete=False)  # newer than every complete one: left for the next save
    assert store.prune(keep=2) == ["step00000002", "step00000003"]
    assert store.tags() == ["step00000004", "step00000006", "step00000008"]


def test_find_checkpoint_takes_a_run_or_one_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    write_checkpoint(store, 2)
    write_checkpoint(store, 4)
    assert find_checkpoint(str(tmp_path / "run")).record["step"] == 4
    assert find_checkpoint(store.uri("step00000002")).record["step"] == 2
    assert find_checkpoint(str(tmp_path / "nothing")) is None
