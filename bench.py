"""Benchmark the U-Net on this device: FLOPs, training and sampling speed, and how close they come to
the device's own matmul rate, in fp32 and bf16. The default network, or the shape run.py would train with
the same --channels, --blocks and --attention, trained as run.py trains it (its objective, weighting and
labels, each step's labels dropped to "no label" at the training default's rate). Sampling is timed as one
network call an image-step asking for a digit; run.py's default guided sampling makes up to three (the label's
push doubles the batch inside the guidance interval, and the run's own guide adds its call).

    python bench.py                      # prints a table, writes gen/bench.json
    python bench.py --device cpu --repeats 7 --out /tmp/bench.json
    python bench.py --precision fp32,bf16    # time bf16 too where auto leaves it out (CUDA; emulated on a CPU)
    python bench.py --processes 1,2      # also training images/s of 1 and 2 processes under torchrun (DDP)
    python bench.py --compile            # the same figures with the network under torch.compile
    python bench.py --channels 32,64,256 # another shape; compare it with a plain call made just before

Every figure is the median of --repeats timed runs after an untimed warm-up, all in one process; with
--processes, the training rate is also timed in N processes, each started by torchrun on its share of the
same global batch, as `torchrun --nproc_per_node=N run.py --mode train` trains.
"""
import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ckpt import fmt, write_atomic
import distributed
from errors import UserError
from hardware import maybe_compile, pick_device, pick_hardware, pick_precision, sync
from model import UNetConfig, count_parameters
from run import channel_list, int_list
from sample import denoiser
from train import DEFAULTS, NO_LABEL, diffusion_for, drop_labels, make_trainable, train_step
from train import network_config as training_config

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def timed(fn, device, repeats, warmup=2):
    """Median seconds of fn() over repeats, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(device, dtype, repeats, n=2048):
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats) / 1e9


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def network_config(args):
    """The model_config run.py's training builds with these --channels, --blocks and --attention (the default
    without them), labelled as run.py trains by default."""
    cfg = dict(DEFAULTS, channels=args.channels, blocks=args.blocks, attention=args.attention)
    return training_config(cfg, NO_LABEL)[0]


def labelled_steps(diffusion, net, ema, opt, x0, labels, device, amp, steps, part=slice(None),
                   label_dropout=DEFAULTS["label_dropout"]):
    """steps training steps on the batch x0 with labels, each dropping labels to "no label" afresh, as
    run.py's training loop does."""
    for _ in range(steps):
        y = drop_labels(labels, label_dropout, NO_LABEL)
        train_step(diffusion, net, ema, opt, x0, y, device, amp, part)


def shape_flags(args):
    """The flags that give the network timed, for run.py and for bench.py's own torchrun workers."""
    return ["--channels", fmt(args.channels), "--blocks", fmt(args.blocks)] + ["--attention"] * args.attention


def train_rate(world, device, amp, batch_size, steps, repeats, model_config):
    """Training images/s of the U-Net of model_config at the global batch batch_size: one process, or (under
    torchrun) all of them together, each on its share with DDP averaging the gradients."""
    torch.manual_seed(0)
    diffusion = diffusion_for(DEFAULTS)
    model, ema, opt = make_trainable(model_config, dict(DEFAULTS), device)
    net, part = world.wrap(model), world.share(batch_size)
    x0 = torch.rand(batch_size, 1, 28, 28, device=device) * 2 - 1
    labels = torch.randint(0, NO_LABEL, (batch_size,), device=device)
    train_steps = functools.partial(labelled_steps, diffusion, net, ema, opt, x0, labels, device, amp, steps, part)
    return steps * batch_size / timed(train_steps, device, repeats)


def process_rates(counts, args, precision):
    """{processes: training images/s}: 1 in this process, more through torchrun running this script."""
    rates = {}
    for n in counts:
        if n == 1:
            rates[n] = train_rate(distributed.World(), pick_device(args.device), PRECISIONS[precision],
                                  args.batch_size, args.steps, args.repeats, network_config(args))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rate.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   os.path.abspath(__file__), "--device", args.device, "--precision", precision, "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--repeats", str(args.repeats), "--out", out,
                   *shape_flags(args)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode or not os.path.exists(out):
                raise UserError(f"torchrun with {n} processes failed: {done.stderr.strip().splitlines()[-1:]}")
            rates[n] = json.load(open(out))["train_images_per_s"]
    return rates


def worker(args):
    """bench.py started by torchrun: time training in every process; rank 0 writes the rate to --out."""
    device, amp = pick_device(args.device), PRECISIONS[args.precision]
    world, device = distributed.start(device)
    try:
        rate = train_rate(world, device, amp, args.batch_size, args.steps, args.repeats, network_config(args))
        if world.main:
            write_atomic(args.out, lambda f: f.write(json.dumps({"train_images_per_s": rate}).encode()))
    finally:
        distributed.stop(world)
    return 0


def fresh(model, compile):
    """The network a timed phase calls; FLOPs are counted on the plain model. With compile, compiled anew for
    each phase, as run.py compiles once per process, so that no phase runs on the graphs that another
    phase's batch size made dynamic."""
    if compile:
        torch.compiler.reset()
    return maybe_compile(model, compile)


def pick_precisions(names, device):
    """The precisions to time: auto times what run.py's --precision auto uses (and fp32)."""
    if names == "auto":
        bf16 = pick_precision("auto", device) is not None
        if not bf16:
            print("bf16 left out: run.py's --precision auto does not use it on this device "
                  "(pass --precision fp32,bf16 to time it)")
        return ["fp32", "bf16"] if bf16 else ["fp32"]
    chosen = names.split(",")
    if not chosen or any(n not in PRECISIONS for n in chosen):
        raise UserError(f"--precision must be auto or a list of {', '.join(PRECISIONS)}, got {names!r}")
    if "bf16" in chosen and device.type == "mps":
        raise UserError("bf16 is not offered on MPS; use --precision fp32")
    return chosen


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help=f"training batch (default {DEFAULTS['batch_size']}, the training default)")
    p.add_argument("--sample-batch", type=int, default=256, help="sampling batch (default 256)")
    p.add_argument("--steps", type=int, default=10, help="training steps per timed repeat (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, median quoted (default 5)")
    p.add_argument("--precision", default="auto", help="auto (fp32, and bf16 on a CPU where it is faster: what "
                                                        "run.py's --precision auto uses), or a list like fp32,bf16")
    p.add_argument("--processes", default="1", metavar="N,M",
                   help="also time training in N, M... processes under torchrun (CPU or N GPUs), e.g. 1,2")
    p.add_argument("--compile", action="store_true",
                   help="time the network under torch.compile, as run.py --compile runs it (compiling is untimed)")
    p.add_argument("--channels", type=channel_list, default=UNetConfig.channels, metavar="A,B,C",
                   help="U-Net widths at 28, 14 and 7 pixels, as run.py takes them "
                        f"(default {fmt(UNetConfig.channels)})")
    p.add_argument("--blocks", type=int_list, default=UNetConfig.blocks, metavar="A,B,C",
                   help=f"residual blocks per level, as run.py takes them (default {fmt(UNetConfig.blocks)})")
    p.add_argument("--attention", action="store_true", help="add run.py's self-attention block at 7x7")
    p.add_argument("--out", default="gen/bench.json", help="the table as JSON (default gen/bench.json)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if distributed.launched():
        return worker(args)
    try:
        device, _ = pick_hardware(args.device, "fp32", args.compile)  # refuses --compile where it cannot run
        precisions = pick_precisions(args.precision, device)
        counts = [int(n) for n in args.processes.split(",") if n.strip().isdigit() and int(n) > 0]
        if not counts or len(counts) != len(args.processes.split(",")):
            raise UserError(f"--processes must be a list of positive counts like 1,2, got {args.processes!r}")
        if args.compile and counts != [1]:
            raise UserError("--compile times one process; drop --processes or --compile")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    cfg = dict(DEFAULTS)
    model_config = network_config(args)
    diffusion = diffusion_for(cfg)
    model, ema, opt = make_trainable(model_config, cfg, device)
    x0 = torch.rand(args.batch_size, 1, 28, 28, device=device) * 2 - 1
    labels = torch.randint(0, NO_LABEL, (args.batch_size,), device=device)
    xs = torch.randn(args.sample_batch, 1, 28, 28, device=device)
    ts = torch.full((args.sample_batch,), 500, device=device)
    ys = torch.randint(0, NO_LABEL, (args.sample_batch,), device=device)
    one = (x0[:1], torch.zeros(1, dtype=torch.long, device=device), labels[:1])
    result = {"device": device.type, "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "parameters": count_parameters(model), "model_config": model_config,
              "gflop_per_image_forward": count_flops(lambda: model(*one)) / 1e9,
              "batch_size": args.batch_size, "sample_batch": args.sample_batch, "compile": args.compile}
    # Training FLOPs counted on a real step (forward, backward): about 3x the forward.
    train_flops = count_flops(lambda: diffusion.loss(lambda x, t: model(x, t, labels), x0).backward())
    train_flops /= args.batch_size
    result["gflop_per_image_train"] = train_flops / 1e9

    for name in precisions:
        amp = PRECISIONS[name]
        peak = matmul_gflops(device, amp or torch.float32, args.repeats)

        net = fresh(model, args.compile)

        train_steps = functools.partial(labelled_steps, diffusion, net, ema, opt, x0, labels, device, amp, args.steps)
        train_ips = args.steps * args.batch_size / timed(train_steps, device, args.repeats)
        denoise = denoiser(fresh(model, args.compile), device, amp)

        def sample_step():
            with torch.inference_mode():
                diffusion.step(denoise(xs, ts, ys).float(), xs, 500, 480, 0.0, None)

        sample_isps = args.sample_batch / timed(sample_step, device, args.repeats)
        result[name] = {"matmul_gflops": peak, "train_images_per_s": train_ips,
                        "train_gflops": train_ips * train_flops / 1e9,
                        "train_fraction_of_matmul": train_ips * train_flops / 1e9 / peak,
                        "sample_image_steps_per_s": sample_isps,
                        "sample_gflops": sample_isps * result["gflop_per_image_forward"],
                        "sample_fraction_of_matmul": sample_isps * result["gflop_per_image_forward"] / peak}

    print(f"{device.type} ({result['cpu']}, {result['threads']} threads), torch {result['torch']}"
          + (", torch.compile" if args.compile else ""))
    default = model_config == network_config(build_parser().parse_args([]))
    shape = "the default" if default else " ".join(shape_flags(args))
    print(f"UNet ({shape}): {result['parameters']:,} parameters, {result['gflop_per_image_forward']:.3f} GFLOP "
          f"per image forward, {result['gflop_per_image_train']:.3f} per training image")
    rows = [("matmul GFLOP/s (2048x2048)", "matmul_gflops", "{:.0f}"),
            (f"training images/s (batch {args.batch_size})", "train_images_per_s", "{:.0f}"),
            ("training GFLOP/s", "train_gflops", "{:.0f}"),
            ("training, fraction of matmul", "train_fraction_of_matmul", "{:.0%}"),
            (f"sampling image-steps/s (batch {args.sample_batch})", "sample_image_steps_per_s", "{:.0f}"),
            ("sampling, fraction of matmul", "sample_fraction_of_matmul", "{:.0%}")]
    names = [n for n in PRECISIONS if n in result]
    print(f"{'':<40}" + "".join(f"{n:>10}" for n in names))
    for label, key, form in rows:
        print(f"{label:<40}" + "".join(f"{form.format(result[n][key]):>10}" for n in names))
    if counts != [1]:
        try:
            rates = process_rates(counts, args, precisions[0])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        result["processes"] = {str(n): rate for n, rate in rates.items()}
        print(f"training images/s (global batch {args.batch_size}, {precisions[0]}), by processes under torchrun: "
              + ", ".join(f"{n}: {rate:.0f}" for n, rate in rates.items()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_atomic(args.out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    distributed.end_process(main())  # under torchrun (--processes), without the interpreter's teardown
