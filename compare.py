"""Train several runs for a budget each, evaluate them the same way, and tabulate and plot the results.

    python compare.py budgets --minutes 5,20,45   # the default recipe at each budget: FID against minutes
    python compare.py budgets --lever 'default,old default' --minutes 5,10,20,40 --speeds docs/fast-machine.json
    python compare.py variants --train-steps 7601 --speeds docs/fast-machine.json \
        --only 'default,eps prediction,mean prediction,l1 loss'   # objective and loss against the default
    python compare.py speeds                       # training images/s of each recipe lever on this machine
    python compare.py recipe --train-steps 7600 --speeds gen/speeds.json --seeds 0,1   # issue 16's levers
    python compare.py samplers --checkpoint PATH --seeds 0,1   # solvers and guidance on one checkpoint
    python compare.py grids --checkpoint A.pt,B.pt,... [--sampler S]   # their digits side by side (grids.png)

A budget is --minutes of this machine's time, or --train-steps. With --speeds (a speeds.json, {recipe:
images/s} on some machine) budgets become steps: --train-steps are the default's, each recipe given the
steps of the same time there, and --minutes become the steps those minutes buy there; so a faster machine
can run the search for a slower one (docs/fast-machine.json holds the issues' reference machine).

Each run lives in ROOT/NAME (its run folder and eval.json). A run whose eval.json is already there is
reused, and a run stopped mid-training is resumed, so an interrupted comparison picks up where it
stopped. The table (markdown) and the figure go to --out-dir. Runs are evaluated and drawn without
autoguidance (NO_GUIDE), whose default guide depends on which checkpoints a run kept, so that every row
measures its network the same way; the samplers screen names each row's guide.
"""
import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import sys
import time

import torch

import figures
from bench import labelled_steps, timed
from ckpt import latest_checkpoint, load_checkpoint, reconcile, save_checkpoint, save_figure, write_atomic
from errors import UserError
from evaluate import Judge, as_asked, evaluate
from hardware import pick_hardware
from sample import EVERYWHERE, NO_GUIDE, SAMPLERS, SampleSettings, load_sampler
from train import DEFAULTS, NO_LABEL, TrainSettings, diffusion_for, make_trainable, network_config, train

GUIDANCE_1 = {"guidance-1": {"guidance": 1.0}}  # the extra eval of a labelled run: plain conditional


def folder(name):
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def train_and_eval(root, name, minutes, given, n_samples, data_dir, device, amp, steps=None, extra=GUIDANCE_1):
    """Train ROOT/NAME for `minutes` or `steps` with the run settings `given` unless its eval.json exists, and
    evaluate it with the default sampling, no guide, into NAME/eval.json and with each of `extra` ({folder:
    SampleSettings fields}; a labelled run's) into NAME/folder/eval.json, each unless already there; returns a
    result row."""
    d = os.path.join(root, folder(name))
    report = os.path.join(d, "eval.json")
    if not {**DEFAULTS, **given}["conditional"]:
        extra = {}  # guidance does not apply without labels
    if os.path.exists(report):
        print(f"{name}: reusing {report}")
    else:
        settings = TrainSettings(data_dir=data_dir, ckpt_dir=d, minutes=minutes, steps=steps, device=device, amp=amp)
        last = latest_checkpoint(d) if glob.glob(os.path.join(d, "run_*", "ckpt_*.pt")) else None
        saved = load_checkpoint(last) if last else None
        if last is None:
            code = train(settings, given)
        elif (minutes and saved["elapsed"] < 60 * minutes) or (steps and saved["step"] < steps):
            code = train(dataclasses.replace(settings, resume=last))  # stopped before its budget: go on
        else:
            code = 0
        if code != 0:
            sys.exit(f"error: training {name} failed")
        # The classifier cache stays in the default checkpoints/ folder, shared by every run.
        evaluate(SampleSettings(checkpoint=latest_checkpoint(d), out_dir=d, data_dir=data_dir, n_samples=n_samples,
                                guide=NO_GUIDE, device=device, amp=amp), cache_dir="checkpoints")
    result = json.load(open(report))
    for sub, fields in extra.items():  # a reused run gets the evals it lacks
        if not os.path.exists(os.path.join(d, sub, "eval.json")):
            evaluate(SampleSettings(checkpoint=result["checkpoint"], out_dir=os.path.join(d, sub), data_dir=data_dir,
                                    n_samples=n_samples, device=device, amp=amp, **{"guide": NO_GUIDE, **fields}),
                     cache_dir="checkpoints")
    ckpt = load_checkpoint(result["checkpoint"])
    log = ckpt["log"]
    images = sum(r["images_per_s"] * r["seconds"] for r in log)
    return {**result, "name": name, "minutes": ckpt["elapsed"] / 60, "train_steps": ckpt["step"],
            "parameters": sum(v.numel() for v in ckpt["ema"].values()),
            "images_per_s": images / sum(r["seconds"] for r in log)}


def table(rows):
    head = ("| run | minutes | steps | parameters | train img/s | FID | precision | recall | confident | entropy |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    line = ("| {name} | {minutes:.1f} | {train_steps} | {parameters:,} | {images_per_s:.0f} | {fid:.1f} "
            "| {precision:.3f} | {recall:.3f} | {confident:.3f} | {entropy:.3f} |\n")
    body = "".join(line.format(**{**r, **r["samples"]}) for r in rows)
    floor = rows[0]["real"]
    return head + body + line.format(name=f"real images, N={rows[0]['n']} (floor)", minutes=0, train_steps=0,
                                     parameters=0, images_per_s=0, **floor).replace("| 0.0 | 0 | 0 | 0 |", "| | | | |")


# Issue 16's training levers, one change each against the default recipe (v, p2 weighting, power EMA 0.1,
# batch 64, lr 1e-3), the first ablations of it; "old default" is the recipe before issue 16.
LEVERS = {
    "default": {},
    "old default": {"objective": "eps", "weighting": "uniform", "batch_size": 128, "ema_decay": 0.999},
    "eps prediction": {"objective": "eps"},
    "uniform weighting": {"weighting": "uniform"},
    "min-snr weighting": {"weighting": "min-snr"},
    "lognormal t": {"weighting": "lognormal"},
    "p2 drawn": {"weighting": "p2-drawn"},
    "stratified t": {"timestep_draw": "stratified"},
    "classic EMA 0.999": {"ema_decay": 0.999},
    "power EMA 0.05": {"ema_length": 0.05},
    "batch 128": {"batch_size": 128},
    "lr 5e-4": {"lr": 5e-4},
    "lr 2e-3": {"lr": 2e-3},
    "linear decay": {"schedule": "linear"},
    "adam beta2 0.99": {"adam_beta2": 0.99},
    "batch 32": {"batch_size": 32},
    "warm-up 50": {"warmup": 50},
    "label dropout 0.2": {"label_dropout": 0.2},
    "32 channels at 28 px": {"channels": (32, 64, 256)},  # issue 16 screens it only if it costs <= 15% images/s
    "attention at 7 px": {"attention": True},
    "upsampling convs at high res": {"up_conv": "high"},  # the default until 2026-11-28
    "scale-shift norm": {"scale_shift": True},
    "x0 prediction": {"objective": "x0"},  # the default until 2026-11-28's twelfth session
    "label before the SiLU": {"label_silu": True},
    "embedding 256 wide": {"emb_dim": 256},
}

# Issue 17's variants against the default (v prediction, mse, the U-Net): what the network predicts, the loss
# and the network; then the MLP shapes screened for the MLP's default.
VARIANTS = {
    "default": {},
    "eps prediction": {"objective": "eps"},
    "x0 prediction": {"objective": "x0"},
    "mean prediction": {"objective": "mean"},  # under the bound's weighting, vlb, at T = 100 (train.for_dataset)
    "mean prediction at T 1000": {"objective": "mean", "timesteps": 1000},  # the bound at DDPM's own T
    "l1 loss": {"loss": "l1"},
    "mlp": {"arch": "mlp"},
}
MLP_SHAPES = {f"mlp {w} x {d}": {"arch": "mlp", "width": w, "depth": d}  # width x residual blocks
              for w, d in [(256, 3), (384, 3), (512, 3), (1024, 3), (1024, 5), (2048, 3), (2048, 5)]}
KNOWN = {**LEVERS, **VARIANTS, **MLP_SHAPES}

# Issue 14's screen: solver, steps and guidance, on one checkpoint (fields of SampleSettings), each on top of
# the default autoguidance where the checkpoint's run kept its half-way checkpoint; then the old default, no guide.
SAMPLER_CONFIGS = [
    *[dict(sampler="dpm2m", guidance=w) for w in (1.0, 1.25, 1.3, 1.5, 1.75, 2.0)],  # in the default interval
    dict(sampler="dpm2m", guidance=1.5, steps=10), dict(sampler="dpm2m", guidance=1.5, steps=15),
    dict(sampler="dpm2m", guidance=1.5, interval=(100, 800)), dict(sampler="dpm2m", guidance=1.5, interval=EVERYWHERE),
    dict(sampler="dpm2m-sde", guidance=1.5), dict(sampler="dpm2m-sde", guidance=1.0),
    dict(sampler="ddim", guidance=1.5, steps=50),
    dict(sampler="heun", guidance=1.5, steps=10), dict(sampler="heun", guidance=1.25, steps=10),
    dict(sampler="dpm2m", guidance=1.5, guide=NO_GUIDE), dict(sampler="dpm2m", guidance=1.25, guide=NO_GUIDE),
]


def lever(name):
    """The run settings of a lever, or of levers joined by " + " (applied left to right)."""
    given = {}
    for part in name.split(" + "):
        if part not in KNOWN:
            raise UserError(f"unknown lever {part!r}; choose from {', '.join(KNOWN)}, or join them with ' + '")
        given.update(KNOWN[part])
    return given


def cost_key(name):
    """What a training step's cost depends on: the network and the batch (the loss weighting, objective,
    learning rate, EMA and where the label joins the embedding cost next to nothing)."""
    cfg = {**DEFAULTS, **lever(name)}
    return tuple(cfg[k] for k in ("arch", "channels", "blocks", "attention", "up_conv", "scale_shift", "width", "depth",
                                       "batch_size"))


def lever_speeds(names, device, amp, steps=8, repeats=3):
    """Training images/s of each lever on this device: bench.py's median of `repeats` timings of `steps` steps
    on random labelled batches, after an untimed round; measured once per cost_key."""
    result, measured = {}, {}
    for name in names:
        if cost_key(name) in measured:
            result[name] = measured[cost_key(name)]
            continue
        cfg = {**DEFAULTS, **lever(name)}
        model_config, _ = network_config(cfg, NO_LABEL)
        model, ema, opt = make_trainable(model_config, cfg, device)
        x0 = torch.rand(cfg["batch_size"], 1, 28, 28, device=device) * 2 - 1
        y = torch.randint(0, NO_LABEL, (cfg["batch_size"],), device=device)
        train_steps = functools.partial(labelled_steps, diffusion_for(cfg), model, ema, opt, x0, y, device, amp, steps,
                                        label_dropout=cfg["label_dropout"])
        seconds = timed(train_steps, device, repeats, warmup=1)
        result[name] = measured[cost_key(name)] = steps * cfg["batch_size"] / seconds
        print(f"{name}: {result[name]:.1f} training images/s", flush=True)
    return result


def lever_steps(name, train_steps, speeds):
    """The steps of `name` that take the CPU time of train_steps steps of the default recipe."""
    if speeds is None:
        return train_steps
    batch = {**DEFAULTS, **lever(name)}["batch_size"]
    return round(train_steps * speed_of(name, speeds) / speed_of("default", speeds) * DEFAULTS["batch_size"] / batch)


def speed_of(name, speeds):
    """A recipe's images/s in `speeds`: its own if measured, else that of a measured recipe of the same cost_key,
    else the product of its parts' speeds relative to the default's."""
    if name in speeds:
        return speeds[name]
    same = [v for k, v in speeds.items()
            if all(part in KNOWN for part in k.split(" + ")) and cost_key(k) == cost_key(name)]
    if same:
        return same[0]
    if " + " not in name:
        raise UserError(f"no speed for {name!r} in the speeds file; run python compare.py speeds")
    return speed_of("default", speeds) * math.prod(speed_of(part, speeds) / speed_of("default", speeds)
                                                   for part in name.split(" + "))


def evaluate_raw_weights(result, n_samples, data_dir, device, amp):
    """The default eval of a row's raw (not averaged) weights, into ROOT/NAME/raw-weights/eval.json unless
    already there: a copy of its checkpoint with the raw weights in the EMA's place, which sampling uses."""
    out = os.path.join(os.path.dirname(os.path.dirname(result["checkpoint"])), "raw-weights")
    if not os.path.exists(os.path.join(out, "eval.json")):
        ckpt = load_checkpoint(result["checkpoint"])
        path = os.path.join(out, "run_001", os.path.basename(result["checkpoint"]))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint({**ckpt, "ema": ckpt["model"]}, path)
        evaluate(SampleSettings(checkpoint=path, out_dir=out, data_dir=data_dir, n_samples=n_samples, guide=NO_GUIDE,
                                device=device, amp=amp), cache_dir="checkpoints")


def budget_runs(root, names, minutes, train_steps, speeds_file, seed, n_samples, data_dir, device, amp,
                extra=GUIDANCE_1):
    """Each recipe in `names` at each budget: --minutes of wall clock, or --train-steps; with a speeds file,
    each minute budget becomes the steps those minutes buy at that recipe's images/s there (so a fast
    machine can draw a slow one's curve), and step budgets are the default's, each recipe given the steps of
    the same time. Returns the result rows and {recipe: [(minutes or steps, FID, confident)]}."""
    speeds = json.load(open(speeds_file)) if speeds_file else None
    budgets = [float(x) for x in (train_steps or minutes or "5,20,45").split(",")]
    plan = []  # (name, given, run name, minutes or None, steps or None, x), all worked out before any training
    for name in names:
        given = {**lever(name), "seed": seed}
        batch = {**DEFAULTS, **given}["batch_size"]
        for b in budgets:
            if speeds and not train_steps:
                steps, x = round(b * 60 * speed_of(name, speeds) / batch), b
            elif speeds:
                steps = lever_steps(name, int(b), speeds)
                x = steps * batch / speed_of(name, speeds) / 60
            else:
                steps, x = (int(b), int(b)) if train_steps else (None, b)
            if steps is not None and steps < 1:
                raise UserError(f"a budget of {b:g} buys {name!r} no training step; give a larger one")
            run = f"{name}, seed {seed}, {steps} steps" if steps else f"{name}, {b:g} min"
            plan.append((name, given, run, None if steps else b, steps, x))
    rows, series = [], {}
    for name, given, run, m, steps, x in plan:
        r = train_and_eval(root, run, m, given, n_samples, data_dir, device, amp, steps=steps, extra=extra)
        rows.append(r)
        series.setdefault(name, []).append((x, r["samples"]["fid"], r["samples"]["confident"]))
    return rows, series


def variants_table(rows):
    """The variants as markdown: each run at its default sampling and with the ancestral DDPM sampler."""
    head = ("| variant | steps | train img/s | parameters | sampler | FID | confident | worst digit as asked "
            "| FID, ddpm | confident, ddpm |\n| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n")
    body = ""
    for r in rows:
        d = os.path.dirname(os.path.dirname(r["checkpoint"]))
        ddpm = json.load(open(os.path.join(d, "ddpm", "eval.json")))["samples"]
        body += (f"| {r['name']} | {r['train_steps']} | {r['images_per_s']:.0f} | {r['parameters']:,} "
                 f"| {r['sampler']} {r['steps']} | {r['samples']['fid']:.1f} | {r['samples']['confident']:.3f} "
                 f"| {worst(r):.1%} | {ddpm['fid']:.1f} | {ddpm['confident']:.3f} |\n")
    floor = rows[0]["real"]
    return head + body + (f"| real images, N={rows[0]['n']} (floor) | | | | | {floor['fid']:.1f} "
                          f"| {floor['confident']:.3f} | | | |\n")


def worst(result):
    return min(a for a in result["as_asked"] if a is not None) if result.get("as_asked") else float("nan")


def recipe_table(rows):
    """The recipe screen as markdown: each run at the default sampling and at guidance 1."""
    head = ("| lever, seed | steps | FID | precision | recall | confident | entropy | worst digit as asked "
            "| FID, guidance 1 | confident, guidance 1 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | ---: |\n")
    line = ("| {name} | {steps} | {fid:.1f} | {precision:.3f} | {recall:.3f} | {confident:.3f} | {entropy:.3f} "
            "| {worst:.1%} | {g1} | {g1c} |\n")
    body = ""
    for r in rows:
        d = os.path.dirname(os.path.dirname(r["checkpoint"]))  # ROOT/NAME
        g1 = json.load(open(os.path.join(d, "guidance-1", "eval.json")))["samples"]
        body += line.format(name=r["name"], steps=r["train_steps"], worst=worst(r), g1=f"{g1['fid']:.1f}",
                            g1c=f"{g1['confident']:.3f}", **r["samples"])
        raw = os.path.join(d, "raw-weights", "eval.json")
        if os.path.exists(raw):
            e = json.load(open(raw))
            body += line.format(name=r["name"] + ", raw weights (no EMA)", steps=r["train_steps"], worst=worst(e),
                                g1="", g1c="", **e["samples"])
    floor = rows[0]["real"]
    return head + body + line.format(name=f"real images, N={rows[0]['n']} (floor)", steps="", worst=float("nan"),
                                     g1="", g1c="", **floor)


def screen_samplers(checkpoint, seeds, n, data_dir, out_dir, device, amp):
    """Issue 14's screen: each of SAMPLER_CONFIGS on one checkpoint, the same seeds, one Judge; a markdown row
    per configuration and seed, appended to out_dir/samplers.md as each finishes."""
    if not checkpoint:
        raise UserError("samplers needs --checkpoint PATH")
    judge = Judge(data_dir, "checkpoints", device)
    out = os.path.join(out_dir, "samplers.md")
    with open(out, "a") as f:
        f.write(f"\n{checkpoint}, N={n}\n\n| sampler | guidance | interval | guide | seed | FID | precision "
                "| recall | confident | entropy | worst digit as asked | seconds |\n"
                "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    for seed in seeds:
        floor = judge.floor(n, seed)
        with open(out, "a") as f:
            f.write(f"| real images (floor) | | | | {seed} | {floor['fid']:.1f} | {floor['precision']:.3f} "
                    f"| {floor['recall']:.3f} | {floor['confident']:.3f} | {floor['entropy']:.3f} | | |\n")
        for c in SAMPLER_CONFIGS:
            sp = load_sampler(SampleSettings(checkpoint=checkpoint, seed=seed, device=device, amp=amp, **c))
            asked = sp.labels(n, seed)
            t0 = time.time()
            fake = sp.generate(n, seed, labels=asked)
            seconds = time.time() - t0
            m, drawn = judge(fake, seed)
            worst_digit = min(a for a in as_asked(drawn, asked) if a is not None)
            guide = f"{os.path.basename(sp.guide)}, weight {sp.guide_weight:g}" if sp.guide else "none"
            row = (f"| {sp.plan.describe(sp.sampler)} | {sp.guidance:g} | {list(sp.interval)} | {guide} "
                   f"| {seed} | {m['fid']:.1f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['confident']:.3f} "
                   f"| {m['entropy']:.3f} | {worst_digit:.1%} | {seconds:.1f} |\n")
            print(row, end="", flush=True)
            with open(out, "a") as f:
                f.write(row)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["budgets", "variants", "speeds", "recipe", "samplers", "grids"])
    p.add_argument("--minutes", default=None,
                   help="budgets, variants: a list like 5,20,45 (default: budgets 5,20,45, variants 20)")
    p.add_argument("--train-steps", default=None,
                   help="budgets: a list of step budgets instead of minutes; recipe: the default's steps (7600)")
    p.add_argument("--lever", default="default",
                   help="budgets: the recipes to train, comma-separated names from LEVERS, VARIANTS or "
                        "MLP_SHAPES (default: default)")
    p.add_argument("--only", default=None, help="recipe, variants, speeds: comma-separated names to run (default all)")
    p.add_argument("--speeds", default=None,
                   help="recipe, budgets, variants: a speeds.json ({lever: images/s}); each lever gets the steps "
                        "that take the default's time, and --minutes become the steps those minutes buy at these "
                        "speeds (default: equal steps, wall-clock minutes)")
    p.add_argument("--seeds", default="0", help="recipe, samplers: comma-separated seeds; budgets, variants: "
                                                  "the first (default 0)")
    p.add_argument("--checkpoint", default=None,
                   help="samplers: the checkpoint to screen; grids: comma-separated checkpoints to draw side by "
                        "side into grids.png")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="grids: draw every checkpoint with this sampler at its default steps (default: each "
                        "checkpoint's own, as run.py --mode sample does)")
    p.add_argument("--root", default="experiments", help="where the runs go (default experiments)")
    p.add_argument("--out-dir", default="gen", help="table and figure (default gen)")
    p.add_argument("--n-samples", type=int, default=None, help="eval N (default 1000)")
    p.add_argument("--data-dir", default="dataset/mnist")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = p.parse_args(argv)
    try:
        compare(args)
    except UserError as e:
        sys.exit(f"error: {e}")


def compare(args):
    device, amp = pick_hardware(args.device, args.precision)
    what, root, out_dir, data_dir = args.what, args.root, args.out_dir, args.data_dir
    os.makedirs(out_dir, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    if what == "speeds":
        names = args.only.split(",") if args.only else list(LEVERS)
        speeds = lever_speeds(names, device, amp)
        out = os.path.join(out_dir, "speeds.json")
        write_atomic(out, lambda f: f.write((json.dumps(speeds, indent=1) + "\n").encode()))
        print(f"wrote {out}")
        return
    if what == "grids":  # checkpoints made elsewhere (several machines, sessions): their digits side by side
        paths = [p.strip() for p in (args.checkpoint or "").split(",")]
        if "" in paths:
            raise UserError("grids needs --checkpoint PATH,PATH,... (no empty item, no stray comma)")
        titles = [describe_checkpoint(p) for p in paths]  # every file checked before any sampling
        out = os.path.join(out_dir, "grids.png")
        save_figure(side_by_side(paths, titles, device, amp, args.sampler), out)
        print(f"wrote {out}")
        return
    if what == "samplers":
        return screen_samplers(args.checkpoint, seeds, args.n_samples or 1000, data_dir, out_dir, device, amp)
    if what == "recipe":
        speeds = json.load(open(args.speeds)) if args.speeds else None
        names = args.only.split(",") if args.only else list(LEVERS)
        for name in names:
            lever(name)
        base = int(args.train_steps or 7600)  # about 20 minutes of the fast machine
        rows = []
        for name in names:
            for seed in seeds:
                steps = lever_steps(name, base, speeds)
                row = train_and_eval(root, f"{name}, seed {seed}, {steps} steps", None,
                                     {**lever(name), "seed": seed}, args.n_samples or 1000, data_dir, device, amp,
                                     steps=steps)
                rows.append(dict(row, name=f"{name}, seed {seed}"))
                if name == "default":
                    evaluate_raw_weights(row, args.n_samples or 1000, data_dir, device, amp)
        return write_table(recipe_table(rows), os.path.join(out_dir, "recipe.md"))
    n_samples, minutes = args.n_samples, args.minutes
    if what == "budgets":
        rows, series = budget_runs(root, args.lever.split(","), minutes, args.train_steps, args.speeds, seeds[0],
                                   n_samples or 1000, data_dir, device, amp)
        xlabel = ("training minutes at the speeds in " + os.path.basename(args.speeds) if args.speeds else
                  "training steps" if args.train_steps else "training minutes")
        fig = figures.budget_curves(series, rows[0]["real"], f"FID and confident share (N={rows[0]['n']}, "
                                    "default sampling, no guide) against the training budget", xlabel)
        save_figure(fig, os.path.join(out_dir, "budgets.png"))
    else:
        names = args.only.split(",") if args.only else list(VARIANTS)
        # Each variant also sampled by the ancestral DDPM sampler, the one sampler every objective takes.
        rows, _ = budget_runs(root, names, minutes or (None if args.train_steps else "20"), args.train_steps,
                              args.speeds, seeds[0], n_samples or 1000, data_dir, device, amp,
                              extra={**GUIDANCE_1, "ddpm": {"sampler": "ddpm"}})
        save_figure(side_by_side([r["checkpoint"] for r in rows],
                                 [f"{r['name']}\nFID {r['samples']['fid']:.0f}" for r in rows], device, amp),
                    os.path.join(out_dir, "variants.png"))
        return write_table(variants_table(rows), os.path.join(out_dir, "variants.md"))
    write_table(table(rows), os.path.join(out_dir, "budgets.md"))


def side_by_side(checkpoints, titles, device, amp, sampler=None):
    """What each checkpoint's sample.png shows (64 digits drawn from the class prior with its default sampling,
    no guide, or with `sampler`, seed 0), one grid per checkpoint under its title."""
    # All loaded, and a sampler one of them refuses said, before any drawing.
    samplers = [load_sampler(SampleSettings(checkpoint=path, dataset="mnist", sampler=sampler, guide=NO_GUIDE,
                                            device=device, amp=amp)) for path in checkpoints]
    return figures.panels([sp.generate(64, 0, labels=sp.labels(64, 0)) for sp in samplers], titles)


def describe_checkpoint(path):
    """A grid's title from what the checkpoint records: objective, loss, weighting, network, steps."""
    ckpt = load_checkpoint(path)
    cfg = reconcile({}, DEFAULTS, ckpt, path)  # older checkpoints: what they trained with
    if cfg["dataset"] != "mnist":
        raise UserError(f"{path} was trained on {cfg['dataset']} (2D points), not MNIST; grids draws digits, "
                        f"so leave it out of --checkpoint")
    net = f"mlp {cfg['width']} x {cfg['depth']}" if cfg["arch"] == "mlp" else ", ".join(
        [cfg["arch"]] + ["attention"] * cfg["attention"] + ["up-conv high"] * (cfg["up_conv"] == "high")
        + ["scale-shift"] * cfg["scale_shift"] + ["label-silu"] * cfg["label_silu"]
        + [f"emb {cfg['emb_dim']}"] * bool(cfg["emb_dim"]))
    return (f"{cfg['objective']} prediction, {cfg['loss']} loss\n{cfg['weighting']} weighting, {net}\n"
            f"{ckpt['step']:,} steps")


def write_table(text, path):
    """Print a markdown table and write it to path."""
    print(text)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
