"""Property-based: no argument list, however odd, gets a traceback out of the command line."""
import contextlib
import io
import os
import shutil

import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run
import train as training
from conftest import make_mnist

# Each flag with good, borderline and bad values. CKPT, DATA, ... stand for paths in the test's folder.
VALUES = {
    "--mode": ["train", "sample", "eval", "paint"],
    "--device": ["auto", "cpu", "cuda", "mps", "tpu"],
    "--precision": ["auto", "fp32", "bf16", "fp16"],
    "--checkpoint": ["CKPT", "missing.pt", "", "DATA"],
    "--data-dir": ["DATA", "nowhere"],
    "--ckpt-dir": ["CKPTDIR", "elsewhere", "CKPT"],
    "--out-dir": ["OUT", "CKPT"],
    "--epochs": ["1", "2", "0", "-1", "x"],
    "--minutes": ["0.002", "0", "nan", "inf", "-1"],
    "--batch-size": ["16", "1", "0", "100000"],
    "--lr": ["1e-3", "0", "nan", "1e30"],
    "--warmup": ["1", "0", "1000"],
    "--adam-beta2": ["0.99", "0", "1", "nan"],
    "--schedule": ["cosine", "constant", "linear", "step"],
    "--ema-decay": ["0.9", "0", "2", "nan"],
    "--seed": ["0", "-5", "x"],
    "--timesteps": ["20", "5", "1", "0"],
    "--channels": ["8,16,32", "8,8,8", "3,5,7", "8,16", "0,8,8", "a,b,c"],
    "--blocks": ["1,1,1", "1,2,1", "0,1,1"],
    "--emb-dim": ["64", "60", "0"],
    "--arch": ["unet", "mlp", "cnn"],
    "--width": ["32", "0"],
    "--depth": ["1", "0"],
    "--objective": ["eps", "x0", "v", "mean", "velocity"],
    "--loss": ["mse", "l1", "huber"],
    "--label-dropout": ["0", "0.5", "1", "-0.1"],
    "--keep": ["1", "0"],
    "--train-steps": ["1", "0"],
    "--weighting": ["p2", "p2-drawn", "lognormal", "snr"],
    "--up-conv": ["high", "low", "middle"],
    "--ema-length": ["0.1", "0.3", "0"],
    "--eval-every": ["1", "0"],
    "--n-samples": ["1", "3", "0"],
    "--sampler": ["ddpm", "ddim", "dpm2m", "dpm2m-sde", "heun", "euler"],
    "--churn": ["0", "10", "-1"],
    "--spacing": ["trailing", "logsnr", "karras", "linear"],
    "--guidance-interval": ["100,600", "600,100", "x"],
    "--steps": ["1", "3", "1000", "0"],
    "--eta": ["0", "1", "0.5", "2", "nan"],
    "--sample-seed": ["0", "7", "x"],
    "--digit": ["0", "9", "10", "-1"],
    "--guidance": ["0", "1", "3", "-1", "nan"],
}
# --compile left out: it compiles for a minute; --help exits early
SWITCHES = ["--resume", "--unconditional", "--attention", "--scale-shift", "--label-silu"]

flag_and_value = st.sampled_from(sorted(VALUES)).flatmap(lambda f: st.sampled_from(VALUES[f]).map(lambda v: [f, v]))
junk = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=6).map(lambda s: [s])  # argv has no NUL
argv_lists = st.tuples(
    st.sampled_from([["--mode", "train"], ["--mode", "sample"], ["--mode", "eval"], []]),
    st.lists(st.one_of(flag_and_value, flag_and_value, st.sampled_from(SWITCHES).map(lambda s: [s]), junk),
             max_size=7),
).map(lambda parts: parts[0] + [a for token in parts[1] for a in token])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=argv_lists)
def test_no_argument_list_gets_a_traceback(argv, tmp_path_factory, monkeypatch, trained):
    root = tmp_path_factory.mktemp("fuzz")
    data = make_mnist(str(root / "dataset" / "mnist"))
    monkeypatch.chdir(root)  # the default folders (dataset/mnist, checkpoints, gen) are the test's own
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # no network
    # A tiny network by default, so whatever trains or samples finishes in a moment.
    for key, value in dict(channels=(8, 16, 32), blocks=(1, 1, 1), timesteps=20, batch_size=16, width=32,
                           depth=1).items():
        monkeypatch.setitem(training.DEFAULTS, key, value)
    shutil.copytree(trained["ckpt_dir"], root / "ckpt")  # a labelled tiny run of its own, free to change
    checkpoint = str(root / "ckpt" / os.path.relpath(trained["checkpoint"], trained["ckpt_dir"]))
    paths = {"CKPT": checkpoint, "DATA": data, "CKPTDIR": str(root / "ckpt"), "OUT": str(root / "out")}
    argv = [paths.get(a, a) for a in argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = run.main(argv)
        except SystemExit as e:  # --help, printed by argparse
            code = e.code
    err = err.getvalue()
    assert "Traceback" not in err and code in (0, 2), (argv, err[-500:])
    if code == 2:
        assert err.strip().splitlines()[-1].startswith("error: "), (argv, err[-500:])
