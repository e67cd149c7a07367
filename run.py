"""The command line: train a DDPM on MNIST, sample from a checkpoint, or measure its samples.

    python run.py --mode train     # checkpoints/run_NNN/ckpt_*.pt, log.jsonl, loss.png
    python run.py --mode sample    # gen/sample.png, process.png, process.gif, digits.png, forward.png
    python run.py --mode eval      # FID, precision, recall and more, into gen/eval.json
    torchrun --nproc_per_node=2 run.py --mode train   # the same training, in 2 processes with DDP

This file only parses and checks the flags, turns them into plain settings and makes one call per mode:
train.train, sample.sample or evaluate.evaluate. See README.md for every flag.
"""
import argparse
import math
import sys

import distributed
from ckpt import fmt, latest_checkpoint
from data import DATASETS
from diffusion import LOSSES, MIN_TIMESTEPS, OBJECTIVES, SPACINGS, TIMESTEP_DRAWS, WEIGHTINGS
from errors import UserError
from evaluate import evaluate
from hardware import pick_hardware
from model import UP_CONVS, UNetConfig
from sample import (DEFAULT_GUIDANCE, DEFAULT_GUIDE_WEIGHT, DEFAULT_INTERVAL_SHARE, DEFAULT_SAMPLER, DEFAULT_STEPS,
                    GUIDED_GUIDANCE, SAMPLERS, SampleSettings, sample)
from train import DEFAULT_EPOCHS, DEFAULTS, MEAN_TIMESTEPS, SCHEDULES, TrainSettings, train

# Flags a mode would ignore are refused rather than silently dropped.
# --dataset is a training setting that sample and eval take as a check of the checkpoint.
TRAINING_FLAGS = (*(k for k in DEFAULTS if k != "dataset"), "epochs", "minutes", "train_steps", "resume", "keep",
                  "eval_every")
SAMPLING_FLAGS = ("n_samples", "sampler", "steps", "spacing", "eta", "churn", "sample_seed", "digit", "guidance",
                  "interval", "guide", "guide_weight")
FLAG_NAMES = {"conditional": "--unconditional", "interval": "--guidance-interval", "guide": "--guide-checkpoint"}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see python run.py --help)", everywhere=True)


def timestep_count(s):
    v = positive_int(s)
    if v < MIN_TIMESTEPS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_TIMESTEPS} (below that the betas, scaled by 1000/T, "
                                         f"would exceed 1), got {s!r}")
    return v


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def number_type(ok, what):
    """An argparse type: a float that passes ok(v), else an error saying it must be `what`."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            v = math.nan  # fails every check below
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v
    return parse


positive_float = number_type(lambda v: v > 0 and math.isfinite(v), "a positive number")
fraction = number_type(lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1")
decay_rate = number_type(lambda v: 0 < v < 1, "a number between 0 and 1, like 0.999")
# A power-function profile averages at most the whole run so far (gamma -> 0): a relative std of sqrt(1/12).
ema_length = number_type(lambda v: 0 < v < 0.288, "a share of the run between 0 and 0.288, like 0.1")
guidance_weight = number_type(lambda v: 0 <= v <= 100, "a number from 0 to 100 (1 = plain conditional)")


def int_list(s):
    try:
        v = tuple(int(p) for p in s.split(","))
    except ValueError:
        v = ()
    if len(v) != 3 or min(v) < 1:
        raise argparse.ArgumentTypeError(f"must be three positive integers like 1,1,2, got {s!r}")
    return v


def timestep_range(s):
    try:
        v = tuple(int(p) for p in s.split(","))
    except ValueError:
        v = ()
    if len(v) != 2 or not 0 <= v[0] <= v[1]:
        raise argparse.ArgumentTypeError(f"must be two timesteps LO,HI with 0 <= LO <= HI, like 100,600, got {s!r}")
    return v


def embedding_width(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 8 or v % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 like 256 (a quarter of it are sin and "
                                         f"cos pairs), got {s!r}")
    return v


def channel_list(s):
    v = int_list(s)
    if any(c % UNetConfig.groups for c in v):
        raise argparse.ArgumentTypeError(f"must be three multiples of {UNetConfig.groups} (the GroupNorm groups) "
                                         f"like 16,64,256, got {s!r}")
    return v


def build_parser():
    D = DEFAULTS
    p = Parser(description="DDPM on MNIST: train a small U-Net, sample from it, or measure its samples.")
    p.add_argument("--mode", required=True, choices=["train", "sample", "eval"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto picks cuda, then mps, then cpu (default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast with fp32 weights; auto: bf16 on a CPU where measured faster (default auto)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network for training and sampling (CUDA, CPU; not MPS)")
    p.add_argument("--dataset", choices=DATASETS,
                   help="train: mnist, or heart, 2D points on a heart curve (made on the spot, no labels, a point "
                        "MLP); sample and eval: the data set the checkpoint must be of (default: mnist for a new "
                        "run, the checkpoint's otherwise)")
    p.add_argument("--data-dir", default="dataset/mnist", metavar="DIR", help="MNIST root (default dataset/mnist)")
    p.add_argument("--ckpt-dir", default="checkpoints", metavar="DIR",
                   help="runs go in DIR/run_NNN; the eval classifier in DIR (default checkpoints)")
    p.add_argument("--out-dir", default="gen", metavar="DIR", help="figures and eval.json (default gen)")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint to sample, evaluate or resume "
                                                        "(default: the newest under --ckpt-dir)")
    g = p.add_argument_group("training (a new run takes the defaults; --resume takes the checkpoint's)")
    g.add_argument("--resume", action="store_true", default=None, help="continue the newest run, or --checkpoint")
    g.add_argument("--epochs", type=positive_int, metavar="N",
                   help=f"total epochs of the run (default {DEFAULT_EPOCHS['mnist']}, {DEFAULT_EPOCHS['heart']} for "
                        f"the heart, or no limit with --minutes or --train-steps)")
    g.add_argument("--minutes", type=positive_float, metavar="M",
                   help="wall-clock budget of the run in minutes, kept across --resume; with --epochs, "
                        "whichever ends first. The lr schedule and the end of training follow the budget; "
                        "extending a run with --resume stretches the decay (cosine or linear) over the new "
                        "budget, so the lr rises again")
    g.add_argument("--train-steps", type=positive_int, metavar="N",
                   help="optimizer steps of the run, kept across --resume; with --epochs or --minutes, whichever "
                        "ends first (the lr schedule follows it)")
    g.add_argument("--batch-size", type=positive_int, metavar="N", help=f"default {D['batch_size']}")
    g.add_argument("--lr", type=positive_float, help=f"AdamW learning rate (default {D['lr']})")
    g.add_argument("--adam-beta2", type=decay_rate, metavar="B",
                   help="AdamW's second-moment decay: how many recent steps set each weight's step size, about "
                        f"1 / (1 - B) (default {D['adam_beta2']})")
    g.add_argument("--warmup", type=positive_int, metavar="N", help=f"steps of linear lr warm-up (default {D['warmup']})")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help=f"lr after warm-up: cosine or linear decay to 0 at the end of the budget, or constant "
                        f"(default {D['schedule']})")
    g.add_argument("--ema-decay", type=decay_rate, metavar="D",
                   help="the classic EMA instead of the power EMA: after n updates the decay is min(D, "
                        "(1+n)/(10+n)), which reaches D only after (10D-1)/(1-D) updates (8,991 for 0.999)")
    g.add_argument("--ema-length", type=ema_length, metavar="L",
                   help="EDM2's power-function EMA (Karras et al. 2024): at every point of the run it averages "
                        "about the last L of the steps so far (its relative standard deviation, 0.05 to 0.2), so "
                        f"it fits runs of any length (default {D['ema_length']})")
    g.add_argument("--seed", type=int, help=f"initialisation, data order and noise (default {D['seed']})")
    g.add_argument("--arch", choices=["unet", "mlp"],
                   help="the network: a residual conv U-Net, or an MLP over the flattened image (default unet)")
    g.add_argument("--width", type=positive_int, metavar="N", help=f"MLP hidden width (default {D['width']})")
    g.add_argument("--depth", type=positive_int, metavar="N", help=f"MLP residual blocks (default {D['depth']})")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help="what the network predicts: the noise eps (DDPM), the clean image x0, the velocity v = "
                        "sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (x0 by a skip from x_t plus the output), or the posterior "
                        "mean of x_{t-1}, made from a noise output by DDPM's eq. 11 (sampled with --sampler ddpm by "
                        "default; every sampler serves it) "
                        f"(default {D['objective']}; x0 for --arch mlp, which learns it alone, and for --loss l1)")
    g.add_argument("--loss", choices=list(LOSSES),
                   help="the regression loss on that target (default mse; l1 predicts x0 unless --objective is given)")
    g.add_argument("--weighting", choices=WEIGHTINGS,
                   help="where the loss is spent over t: uniform t, unweighted (DDPM); min-snr: x0 error weighted "
                        "min(SNR, 5); p2: weighted SNR/(1+SNR); p2-drawn: p2's loss over its mean weight, t drawn in "
                        "proportion to p2's weight, each draw unweighted; lognormal: t drawn with EDM's ln sigma ~ "
                        "N(-1.2, 1.2), few draws near pure noise; vlb: the variational bound's weight, "
                        "1/(2 beta_t) on the posterior mean, as t drawn in proportion to it "
                        f"(default {D['weighting']}; vlb for --objective mean)")
    g.add_argument("--timestep-draw", choices=TIMESTEP_DRAWS,
                   help="how each batch draws its timesteps from the weighting's distribution: independent, each on "
                        "its own (DDPM), or stratified, one in each 1/B of the distribution by a shared random "
                        "offset (VDM's low-discrepancy sampler): the same loss in expectation, with every batch "
                        f"spread over all noise levels (default {D['timestep_draw']})")
    g.add_argument("--timesteps", type=timestep_count, metavar="T", help=f"diffusion steps (default {D['timesteps']}; "
                   f"{MEAN_TIMESTEPS} for a new --objective mean run on MNIST under its default vlb weighting)")
    g.add_argument("--channels", type=channel_list, metavar="A,B,C",
                   help=f"U-Net widths at 28, 14 and 7 pixels (default {fmt(D['channels'])})")
    g.add_argument("--blocks", type=int_list, metavar="A,B,C",
                   help=f"residual blocks per level (default {fmt(D['blocks'])})")
    g.add_argument("--attention", action="store_true", default=None,
                   help="add a self-attention block at the U-Net's 7x7 level (default: none)")
    g.add_argument("--up-conv", choices=UP_CONVS,
                   help="where the U-Net's upsampling convs run: after the 2x resize (high) or before it, at the "
                        f"lower resolution, 4x fewer FLOPs (low) (default {D['up_conv']})")
    g.add_argument("--scale-shift", action="store_true", default=None,
                   help="the timestep and label embedding scales and shifts each residual block's second "
                        "GroupNorm, as ADM's AdaGN, instead of being added before it (default: added)")
    g.add_argument("--label-silu", action="store_true", default=None,
                   help="the label embedding joins the timestep embedding before its last SiLU, as in ADM and "
                        "diffusers, so what each block takes from the label can change with t (default: after it, "
                        "a fixed offset per label)")
    g.add_argument("--emb-dim", type=embedding_width, metavar="N",
                   help="width of the timestep and label embedding every residual block takes, from N/4 "
                        "sinusoidal features (default: 4 x the first --channels, 64)")
    g.add_argument("--unconditional", dest="conditional", action="store_false", default=None,
                   help="train without digit labels (default: with labels, so the run can also draw a chosen digit)")
    g.add_argument("--label-dropout", type=fraction, metavar="P",
                   help=f"share of each batch trained with no label, so one run samples both ways "
                        f"(default {D['label_dropout']})")
    g.add_argument("--keep", type=positive_int, metavar="K",
                   help="keep only the newest K end-of-epoch checkpoints of the run, plus its last one; K below "
                        "about half the epochs leaves none to guide sampling by default (default: keep all)")
    g.add_argument("--eval-every", type=positive_int, metavar="K",
                   help="every K epochs, FID etc. of 500 DDIM-20 samples (DDPM for --objective mean) into the "
                        "log and loss.png")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--n-samples", type=positive_int, metavar="N", help="images to draw (default: sample 256, eval 1000)")
    g.add_argument("--sampler", choices=SAMPLERS,
                   help="ddpm: ancestral, all T steps; ddim: --steps evenly spaced steps; dpm2m, dpm2m-sde: "
                        "DPM-Solver++(2M) and its SDE form; heun: EDM's Heun, 2 network calls a step, with "
                        f"--churn (default {DEFAULT_SAMPLER}; ddpm for a posterior-mean checkpoint)")
    g.add_argument("--steps", type=positive_int, metavar="N",
                   help="solver steps (default " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    g.add_argument("--spacing", choices=SPACINGS,
                   help="where the solver's steps fall between T-1 and 0: evenly in t (linspace from T-1 to 0, or "
                        "trailing: from T-1, with no call at t=0), evenly in log sigma (logsnr, DPM-Solver's choice) "
                        "or in sigma^(1/7) (karras, EDM's) (default linspace for ddim, trailing otherwise)")
    g.add_argument("--eta", type=float, help="DDIM noise (Song et al. eq. 16): 0 is deterministic DDIM, 1 the "
                                             "ancestral step; default 1, measured best here (README)")
    g.add_argument("--churn", type=float, metavar="S", help="heun: EDM's S_churn, noise added back each step "
                                                            "(default 0, deterministic)")
    g.add_argument("--digit", type=int, choices=range(10), metavar="D",
                   help="sample: a grid of digit D (0-9) (labelled runs; default: the digits in the class prior's proportions)")
    g.add_argument("--guidance", type=guidance_weight, metavar="W",
                   help=f"classifier-free guidance eps_u + W (eps_c - eps_u): 1 is plain conditional, 0 draws "
                        f"with no label (default {GUIDED_GUIDANCE:g} with a guide, {DEFAULT_GUIDANCE:g} without; "
                        f"labelled runs)")
    g.add_argument("--guidance-interval", dest="interval", type=timestep_range, metavar="LO,HI",
                   help=f"apply guidance only at timesteps LO <= t <= HI, plain conditional elsewhere; 0,10000 "
                        f"guides everywhere (default {DEFAULT_INTERVAL_SHARE[0]:g}T,{DEFAULT_INTERVAL_SHARE[1]:g}T: "
                        f"100,600 for T=1000)")
    g.add_argument("--guide-checkpoint", dest="guide", metavar="PATH",
                   help="autoguidance: also push away from this weaker checkpoint's output at every step (an "
                        "earlier or shorter run with the same objective, schedule, labels and data), or none "
                        "(default: a labelled MNIST checkpoint's own run's checkpoint nearest half its steps, "
                        "if kept; else none)")
    g.add_argument("--guide-weight", type=float, metavar="A",
                   help=f"autoguidance weight: eps + (A - 1) (eps_c - eps_guide), above 1 "
                        f"(default {DEFAULT_GUIDE_WEIGHT:g})")
    g.add_argument("--sample-seed", type=int, metavar="S",
                   help="same seed and checkpoint, same images (default 0)")
    return p


def check_mode_flags(args):
    """Refuse a flag that the chosen mode would ignore (such as --steps, DDIM steps, in train mode)."""
    wrong = SAMPLING_FLAGS if args.mode == "train" else TRAINING_FLAGS
    given = [k for k in wrong if getattr(args, k) is not None]
    if given:
        flag = FLAG_NAMES.get(given[0], "--" + given[0].replace("_", "-"))
        kind = "sampling" if args.mode == "train" else "training"
        raise UserError(f"{flag} is a {kind} flag and does nothing in --mode {args.mode}; drop it", everywhere=True)


def train_mode(args, device, amp):
    if args.checkpoint and not args.resume:
        raise UserError("--checkpoint in train mode needs --resume (to continue that run)", everywhere=True)
    resume = (args.checkpoint or latest_checkpoint(args.ckpt_dir)) if args.resume else None
    world, device = distributed.start(device)  # one process, or one of torchrun's
    if world.largest(float(amp is None))[0]:  # each process timed bf16 on its own: all use it, or none
        amp = None
    settings = TrainSettings(data_dir=args.data_dir, ckpt_dir=args.ckpt_dir, resume=resume, epochs=args.epochs,
                             minutes=args.minutes, steps=args.train_steps, keep=args.keep,
                             eval_every=args.eval_every, device=device, amp=amp, compile=args.compile)
    status = train(settings, {key: getattr(args, key) for key in DEFAULTS}, world)
    distributed.stop(world)
    return status


def sample_settings(args, device, amp):
    return SampleSettings(checkpoint=args.checkpoint or latest_checkpoint(args.ckpt_dir), out_dir=args.out_dir,
                          data_dir=args.data_dir, n_samples=args.n_samples, sampler=args.sampler,
                          steps=args.steps, spacing=args.spacing, eta=args.eta, churn=args.churn,
                          seed=args.sample_seed or 0, digit=args.digit, guidance=args.guidance, interval=args.interval,
                          guide=args.guide, guide_weight=args.guide_weight, device=device, amp=amp,
                          compile=args.compile, dataset=args.dataset)


def main(argv=None):
    """The command line; returns the exit status (0 done, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        check_mode_flags(args)
        if args.mode != "train" and distributed.launched():
            raise UserError(f"--mode {args.mode} runs in one process; start it with python run.py, not torchrun",
                            everywhere=True)
        distributed.use_local_gpu()
        device, amp = pick_hardware(args.device, args.precision, args.compile)
        if args.mode == "train":
            return train_mode(args, device, amp)
        elif args.mode == "sample":
            return sample(sample_settings(args, device, amp))
        elif args.mode == "eval":
            return evaluate(sample_settings(args, device, amp), cache_dir=args.ckpt_dir)
        else:
            raise UserError(f"unknown --mode {args.mode!r}; choose train, sample or eval")
    except UserError as e:
        if distributed.rank() == 0:
            say(f"error: {e}")
        elif not e.everywhere:  # this process's own trouble (its data, its GPU): say which process
            say(f"error (rank {distributed.rank()}): {e}")
        return 2
    except KeyboardInterrupt:
        if distributed.rank() == 0:
            say("interrupted; files written so far are complete")
        return 130


def say(line):
    """One line to stderr in a single write, so the processes of a torchrun run never splice their lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    distributed.end_process(main())
