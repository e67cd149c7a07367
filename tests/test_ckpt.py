"""The checkpoint store on its own: settings reconciled on resume, pruning, atomic writes, the lock.
(Killed writes, full disks and bad files are in test_faults.py and test_cli.py.)"""
import os

import pytest

import ckpt
import train
from errors import UserError


def test_a_new_run_takes_the_defaults_and_what_is_given():
    cfg = ckpt.reconcile({"lr": 2e-3, "seed": None}, train.DEFAULTS)
    assert cfg == {**train.DEFAULTS, "lr": 2e-3}


def test_resume_takes_the_checkpoints_settings_and_refuses_others():
    saved = {"train_config": dict(train.DEFAULTS, lr=5e-4, timesteps=50)}
    assert ckpt.reconcile({"lr": None, "timesteps": 50}, train.DEFAULTS, saved, "c.pt")["lr"] == 5e-4
    with pytest.raises(UserError, match="c.pt was trained with --lr 0.0005, not 0.001; drop --lr"):
        ckpt.reconcile({"lr": 1e-3}, train.DEFAULTS, saved, "c.pt")
    with pytest.raises(UserError, match="was trained with labels; drop --unconditional"):
        ckpt.reconcile({"conditional": False}, train.DEFAULTS, saved, "c.pt")


def test_checkpoints_from_before_later_settings_resume_as_they_were_trained():
    """The first checkpoints had no labels, constant lr, eps, mse and the U-Net, and no keys for them."""
    first = {k: v for k, v in train.DEFAULTS.items() if k not in ckpt.ADDED_SETTINGS}
    new = dict(train.DEFAULTS, objective="x0", schedule="cosine", adam_beta2=0.99)  # defaults unlike the first runs'
    cfg = ckpt.reconcile({}, new, {"train_config": first}, "old.pt")
    assert (cfg["conditional"], cfg["label_dropout"], cfg["schedule"], cfg["objective"], cfg["arch"],
            cfg["adam_beta2"]) == (False, 0.0, "constant", "eps", "unet", 0.999)


def test_settings_of_the_other_network_are_refused():
    with pytest.raises(UserError, match="--width does not apply to --arch unet"):
        ckpt.reconcile({"width": 64}, train.DEFAULTS)
    with pytest.raises(UserError, match="--label-dropout needs labels"):
        ckpt.reconcile({"conditional": False, "label_dropout": 0.2}, train.DEFAULTS)


def test_prune_keeps_the_newest_epochs_and_the_last_checkpoint(tmp_path):
    for step in (4, 8, 10, 12, 16, 18):
        open(ckpt.checkpoint_path(str(tmp_path), step), "w").close()
    ckpt.prune_checkpoints(str(tmp_path), keep=2, steps_per_epoch=4)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000012.pt", "ckpt_00000016.pt", "ckpt_00000018.pt"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "f.bin")
    ckpt.write_atomic(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError(28, "No space left on device")
    with pytest.raises(UserError, match="could not write .*f.bin \\(No space left on device\\); the previous"):
        ckpt.write_atomic(path, half_then_fail)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_the_lock_refuses_a_second_holder_and_is_released(tmp_path):
    folder = str(tmp_path / "runs")
    with ckpt.training_lock(folder):
        with pytest.raises(UserError, match=f"another training \\(pid {os.getpid()}\\) is writing into"):
            with ckpt.training_lock(folder):
                pass
    with ckpt.training_lock(folder):  # released on exit
        pass


def test_new_run_folders_count_up_and_empty_leftovers_go(tmp_path):
    os.makedirs(tmp_path / "run_001")
    open(tmp_path / "run_001" / ".ckpt_00000004.pt.tmp123", "w").close()  # a killed write's leftover
    os.makedirs(tmp_path / "run_002" / "x")  # not empty: kept
    assert ckpt.new_run_dir(str(tmp_path)) == str(tmp_path / "run_003")
    assert sorted(os.listdir(tmp_path)) == ["run_002", "run_003"]


def test_the_default_embedding_width_given_by_number_is_the_default():
    """--emb-dim 4 x the first channels builds the default network: a new run records it as the default (0), and
    a run trained with the default resumes with it; another width is refused, both named in numbers."""
    assert ckpt.reconcile({"emb_dim": 64}, train.DEFAULTS)["emb_dim"] == 0
    assert ckpt.reconcile({"emb_dim": 128, "channels": (32, 64, 256)}, train.DEFAULTS)["emb_dim"] == 0
    saved = {"train_config": dict(train.DEFAULTS)}
    assert ckpt.reconcile({"emb_dim": 64}, train.DEFAULTS, saved, "run_001/ckpt.pt")["emb_dim"] == 0
    with pytest.raises(UserError, match="was trained with --emb-dim 64, not 256; drop --emb-dim"):
        ckpt.reconcile({"emb_dim": 256}, train.DEFAULTS, saved, "run_001/ckpt.pt")


def test_ema_decay_asks_for_the_classic_ema_and_cannot_switch_a_power_ema_run():
    assert train.DEFAULTS["ema_length"] and ckpt.reconcile({"ema_decay": 0.99}, train.DEFAULTS)["ema_length"] is None
    assert ckpt.reconcile({}, train.DEFAULTS)["ema_length"] == train.DEFAULTS["ema_length"]
    saved = {"train_config": dict(train.DEFAULTS)}
    with pytest.raises(UserError, match="was trained with --ema-length 0.1; drop --ema-decay"):
        ckpt.reconcile({"ema_decay": train.DEFAULTS["ema_decay"]}, train.DEFAULTS, saved, "run_001/ckpt.pt")
    # A run from before the power EMA resumes with its classic EMA.
    added = ("ema_length", "weighting", "attention", "up_conv", "scale_shift", "label_silu", "emb_dim",
             "timestep_draw")
    old = {"train_config": {k: v for k, v in train.DEFAULTS.items() if k not in added}}
    resumed = ckpt.reconcile({}, train.DEFAULTS, old, "old.pt")
    assert resumed["ema_length"] is None and resumed["up_conv"] == "high"  # nor had it --up-conv
    assert resumed["scale_shift"] is False and resumed["label_silu"] is False and resumed["emb_dim"] == 0
    assert resumed["timestep_draw"] == "independent"  # each t drawn on its own, as it was trained
    stratified = {"train_config": dict(train.DEFAULTS, timestep_draw="stratified")}
    assert ckpt.reconcile({}, train.DEFAULTS, stratified, "new.pt")["timestep_draw"] == "stratified"
