"""What LoRA training costs at full size: seconds per step and peak memory of one optimizer step on the SD 1.5 UNet.

    python benchmarks/lora_training.py [--sizes 256 512] [--steps 2] [--rank 4] [--diffusers]

Builds the SD 1.5 UNet (``UNetConfig.sd15()``, 860 M parameters) with random weights — time and memory do not
depend on the values — freezes it and attaches a rank-``--rank`` LoRA to every attention projection (to_q, to_k,
to_v, to_out: 128 layers, 0.8 M parameters at rank 4), then times a training step as ``ldm finetune`` takes it:
batch 1 of 4-channel latents (size / 8 per side) at a random timestep with a 77-token context, the ε-loss, the
backward pass (into the LoRA only) and an AdamW step. Rows: fp32 and bf16 autocast (only where the CPU has native
bf16: emulated, one step takes hours) × gradient checkpointing off and on. Peak memory is the process's peak
resident set during a step (Linux VmHWM) above the resident set before it: activations, gradients and
optimizer state, beside the UNet's 3.2 GiB of fp32 weights. ``--diffusers`` adds the same step on diffusers'
``UNet2DConditionModel`` with a peft LoRA of the same rank on the same modules and the same weights, timed
alternately with ldm's so load on the machine hits both, and prints the ratio. No assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ldm.convert import export_state_dict, unet_config_to_diffusers, unet_layout
from ldm.gradient_checkpointing import set_gradient_checkpointing
from ldm.lora import LoRA, attach
from ldm.unet import UNet, UNetConfig

from _measure import machine_info, matmul_probe, native_bf16, peak_gib, reset_peak

CPU = torch.device("cpu")


def ldm_model(rank: int) -> tuple[UNet, LoRA]:
    torch.manual_seed(0)
    unet = UNet(UNetConfig.sd15()).requires_grad_(False)
    lora = attach(unet, LoRA.create(unet, rank=rank, targets="attention"))
    for _, layer in lora.items():  # a trained-looking B, so the update is not a multiplication by zero
        torch.nn.init.normal_(layer.up.weight, std=0.01)
    return unet, lora


def diffusers_model(unet: UNet, rank: int):
    import diffusers
    from peft import LoraConfig

    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(unet.config).items()
                                            if not k.startswith("_")})
    ref.load_state_dict(export_state_dict(unet, unet_layout(unet.config, "diffusers")))
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return ref, [p for p in ref.parameters() if p.requires_grad]


def step_fn(forward, params: list[torch.nn.Parameter], size: int, autocast: bool):
    """One training step: ε-loss at a random timestep, backward into ``params``, AdamW."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        z = torch.randn(1, 4, size // 8, size // 8, generator=generator)
        context = torch.randn(1, 77, 768, generator=generator)
        t = torch.randint(0, 1000, (1,), generator=generator)
        eps = torch.randn(z.shape, generator=generator)
        with torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = F.mse_loss(forward(z, t, context).float(), eps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def resident_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_row(steps: dict, repeats: int) -> dict:
    """Warm each side up once (its memory: the peak above what was resident before, i.e. beyond the weights of
    both models), then time ``repeats`` steps per side alternately."""
    out = {}
    for name, step in steps.items():
        reset_peak(CPU)
        before = resident_gib()
        step()
        out[name] = {"peak_gib": peak_gib(CPU) - before, "times": []}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            out[name]["times"].append(time.perf_counter() - start)
    return {name: {"s_per_step": statistics.median(v["times"]), "peak_gib": v["peak_gib"]} for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row and side (after one warm-up)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--diffusers", action="store_true", help="time diffusers + peft beside ldm")
    args = parser.parse_args()
    print(json.dumps(machine_info(CPU) | matmul_probe(2048, CPU)))
    unet, lora = ldm_model(args.rank)
    params = list(lora.parameters())
    ref, ref_params = diffusers_model(unet, args.rank) if args.diffusers else (None, None)
    precisions = ["fp32"] + (["bf16"] if native_bf16(CPU) else [])
    if len(precisions) == 1:
        print("bf16 autocast rows skipped: this CPU has no native bf16 (emulated, a step would take hours)")
    print(f"| size | precision | checkpointing | ldm s/step | ldm step memory GiB |"
          + (" diffusers s/step | diffusers step memory GiB | ldm / diffusers time |" if ref else ""))
    for size in args.sizes:
        for precision in precisions:
            for checkpointing in (False, True):
                set_gradient_checkpointing(unet, checkpointing)
                steps = {"ldm": step_fn(lambda z, t, c: unet(z, t, c), params, size, precision == "bf16")}
                if ref is not None:
                    ref.disable_gradient_checkpointing() if not checkpointing else ref.enable_gradient_checkpointing()
                    steps["diffusers"] = step_fn(lambda z, t, c: ref(z, t, encoder_hidden_states=c).sample, ref_params,
                                                 size, precision == "bf16")
                row = run_row(steps, args.steps)
                line = (f"| {size}² | {precision} | {'on' if checkpointing else 'off'} | "
                        f"{row['ldm']['s_per_step']:.2f} | {row['ldm']['peak_gib']:.2f} |")
                if ref is not None:
                    d = row["diffusers"]
                    line += f" {d['s_per_step']:.2f} | {d['peak_gib']:.2f} | {row['ldm']['s_per_step'] / d['s_per_step']:.2f} |"
                print(line, flush=True)
    print(json.dumps({"after": matmul_probe(2048, CPU)}))


if __name__ == "__main__":
    main()
