"""Fine-tuning a trained model on a few images of your own: LoRA, textual inversion or all of the UNet.

The base model (anything ``load_pipeline`` reads: a Stable Diffusion file or folder, or an ``ldm train`` run) stays
frozen and is recorded in the config by path; the loop (``ldm.loop.TrainLoop``) trains only the new part, so its
checkpoint holds only that and a resume is exact. One step draws the data's latents z_0 ~ q(z | x) (posteriors cached
once, as ``ldm.latent`` does; pixels for a pixel-space run) and minimises the diffusion loss of the model with the
new part in place (ε or v, as the model predicts; ``ldm.losses``):

    lora                W x → W x + (α/r) B A x on the chosen layers (``ldm.lora``)         [Hu et al. 2021, Eq. 3]
    textual-inversion   a new word's rows v* of the text encoders' token table (SD), or a new row of a
                        class-conditional run's class-embedding table: a new class (toy runs)  [Gal et al. 2022, Eq. 2]
    full                every UNet weight (and with train_text_encoder the text encoders')

With class images (``class_data``) each step also denoises those, captioned as the class, so the model keeps what
it knew of the class while it learns the subject  [Ruiz et al. 2023, "DreamBooth", Eq. 2]:

    L = ‖ε − ε_θ(z_t, t, c)‖² + λ ‖ε' − ε_θ(z'_t, t', c_class)‖²

What a run leaves in its directory besides the checkpoint: ``lora.safetensors`` (kohya layout: A1111, ComfyUI and
diffusers load it), ``embedding.safetensors`` (A1111's ``emb_params``, or a toy run's new class rows), or ``model``
(a single file or folder like the input; a run directory for toy runs). ``ldm finetune`` is the command.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .checkpoint import atomic_save, atomic_save_json, atomic_save_safetensors
from .class_embedding import add_class_embedding
from .conditioning import Conditioning
from .convert.lora import save_lora
from .data import ImageDataset
from .data.captions import CaptionedImages, image_paths, load_captioned, long_captions
from .embeddings import save_embedding
from .gradient_checkpointing import set_gradient_checkpointing
from .images import save_grid
from .latent import LatentDataset, encode_dataset
from .loading import checkpoint_kind, load_pipeline
from .loop import LoopConfig, TrainLoop, epoch_indices, with_fields
from .lora import LoRA, attach, detach
from .losses import diffusion_loss
from .runs import CHECKPOINT, CONFIG, read_run
from .sd_checkpoint import save_diffusers_folder, save_single_file
from .stable_diffusion import StableDiffusion

Method = Literal["lora", "textual-inversion", "full"]
METHODS = ("lora", "textual-inversion", "full")
# Learning rates when none is given, per method and model: for Stable Diffusion those of diffusers' example scripts
# (train_dreambooth_lora, textual_inversion, train_dreambooth); toy runs are small and learn faster. A toy LoRA at
# batch 32 and 3e-3 made 94 % of MNIST samples threes after 600 steps (notebook 07); at batch 8 and 1e-3, 54 % after
# 620 steps (5 minutes): a toy step costs little more at batch 32, so the larger batch is the default.
DEFAULT_LR = {("lora", "sd"): 1e-4, ("textual-inversion", "sd"): 5e-3, ("full", "sd"): 5e-6,
              ("lora", "toy"): 3e-3, ("textual-inversion", "toy"): 1e-2, ("full", "toy"): 2e-4}
DEFAULT_BATCH = {"sd": 1, "toy": 32}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run. None means the model's own choice, written in when the run starts: ``resolution`` its
    training size, ``targets`` "attention" (SD) or "attention+conv" (toy UNets, whose attention is at 7×7 only),
    ``loop.lr`` ``DEFAULT_LR``, ``loop.batch_size`` ``DEFAULT_BATCH``."""

    checkpoint: str  # the frozen base: anything ldm.load_pipeline reads
    data: str  # a folder of images (+ same-named .txt captions), or mnist-bundled:D
    method: Method = "lora"
    caption: str | None = None  # one caption for every image (DreamBooth: "a photo of sks dog")
    class_data: str | None = None  # prior preservation: images of the class …
    class_caption: str | None = None  # … and their caption ("a photo of a dog")
    prior_weight: float = 1.0  # λ
    limit: int | None = None  # at most this many images from each folder
    resolution: int | None = None
    rank: int = 4
    alpha: float | None = None  # None: α = r
    targets: str | None = None
    train_text_encoder: bool = False
    token: str = "<sks>"  # textual inversion: the new word
    init_word: str | None = None  # … its vectors start as this word's (SD; default "*") or class's (toy; default: mean)
    vectors: int = 1  # … and how many tokens it stands for
    min_snr_gamma: float | None = None
    caption_dropout: float = 0.0  # this share of captions trained as "": the unconditional model guidance needs
    grad_accum: int = 1
    diffusers_format: bool = False  # also write pytorch_lora_weights.safetensors
    sample_prompt: str | None = None  # default: the first caption
    sample_n: int = 4
    sample_steps: int = 20
    sample_every_minutes: float | None = None
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=None, lr=None, warmup_steps=0, ema_decay=0.0,
                                                                sample_every=0))

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}; known: {', '.join(METHODS)}")
        for name in ("rank", "vectors", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.prior_weight < 0:
            raise ValueError(f"--prior-weight must be ≥ 0, got {self.prior_weight}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if self.class_caption is not None and self.class_data is None:
            raise ValueError("--class-caption goes with --class-data (the class images it describes)")

    def with_(self, **changes) -> "FinetuneConfig":
        """Replace fields; loop fields (steps, lr, batch_size …) may be given directly."""
        return with_fields(self, **changes)


@dataclass
class Part:
    """The instance (or class) images as a step reads them: x_0 in model space by index, and what each one shows."""

    data: LatentDataset | ImageDataset  # batch(indices) → (x_0, indices): the indices stand in for labels
    captions: list[str]
    labels: torch.Tensor | None  # toy runs' class labels
    context: torch.Tensor | None = None  # the captions' text states, cached while the text encoders are frozen
    pooled: torch.Tensor | None = None


class Finetuner(TrainLoop):
    """Fine-tunes a frozen pipeline's new part (``FinetuneConfig.method``); ``pipe`` may be given already loaded."""

    model_fields = ("checkpoint", "method", "rank", "alpha", "targets", "train_text_encoder", "token", "vectors")

    def __init__(self, config: FinetuneConfig, out_dir: str | Path, *, device: str | None = None,
                 progress: bool = True, pipe=None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        for source in (config.data, config.class_data or config.data):
            image_paths(source)  # a missing or empty folder fails now, not after the model has loaded
        self.pipe = pipe if pipe is not None else load_pipeline(config.checkpoint, device=device)
        self.sd = isinstance(self.pipe, StableDiffusion)
        config = self.resolve(config)
        super().__init__(config, out_dir, None, device=device, progress=progress)
        if self.distributed:
            raise ValueError("ldm finetune runs in one process: start it without torchrun")
        for model in self.pipe.models:
            model.requires_grad_(False)
        self.schedule, self.prediction = self.pipe.schedule, self.pipe.sampling.prediction
        self.text_trains = self.sd and (config.method == "textual-inversion" or config.train_text_encoder)
        self.setup_model(self.make_trainable())
        self.install(self.model)
        self.data = self.read_part(config.data, config.caption, instance=True)
        self.prior = self.read_part(config.class_data, config.class_caption) if config.class_data else None
        self.sample_prompt = config.sample_prompt or self.data.captions[0] or config.token
        self.last_sample = time.monotonic()

    # --- what is trained ----------------------------------------------------------------------------------
    def resolve(self, c: FinetuneConfig) -> FinetuneConfig:
        """Check that the method applies to the model and fill in the model's defaults."""
        pipe, kind = self.pipe, "sd" if self.sd else "toy"
        toy_ti = c.method == "textual-inversion" and not self.sd
        if toy_ti and pipe.unet.config.num_classes is None:
            raise ValueError(f"--method textual-inversion adds a row to a class-conditional model's class "
                             f"embedding; {c.checkpoint} is unconditional (train one with --class-conditional, "
                             "or use --method lora or full)")
        if not self.sd and c.train_text_encoder:
            raise ValueError(f"--train-text-encoder: {c.checkpoint} has no text encoder (it is a toy `ldm train` run)")
        if self.sd and (pipe.config.inpainting or pipe.text_encoder is None):
            raise ValueError(f"{c.checkpoint}: fine-tuning an inpainting model or SDXL's refiner is not supported")
        if c.method == "full" and not self.sd and checkpoint_kind(c.checkpoint) != "run":
            raise ValueError(f"--method full on {c.checkpoint}: writing a diffusers DDPM folder is not supported; "
                             "use --method lora")
        factor = pipe.vae.config.downsample_factor if pipe.vae is not None else 1
        size = pipe.config.size if self.sd else pipe.unet.config.sample_size * factor
        resolution = c.resolution or size
        if resolution % factor:
            raise ValueError(f"--resolution {resolution} must be a multiple of {factor} (the VAE's factor)")
        loop = replace(c.loop, lr=c.loop.lr or DEFAULT_LR[c.method, kind],
                       batch_size=c.loop.batch_size or DEFAULT_BATCH[kind])
        return replace(c, checkpoint=str(Path(c.checkpoint).resolve()), resolution=resolution, loop=loop,
                       targets=c.targets or ("attention" if self.sd else "attention+conv"))

    def setup_model(self, model: nn.Module) -> None:
        """The loop's, with ``gradient_checkpointing`` switched on in the frozen UNet: the backward pass of the trained
        part runs through it, and a LoRA or new rows have no stages of their own to checkpoint."""
        loop = self.config.loop
        set_gradient_checkpointing(self.pipe.unet, loop.gradient_checkpointing)
        self.config = replace(self.config, loop=replace(loop, gradient_checkpointing=False))
        try:
            super().setup_model(model)
        finally:
            self.config = replace(self.config, loop=loop)

    def text_models(self) -> dict[str, nn.Module]:
        return {name: m for name in TEXT_ENCODERS if (m := getattr(self.pipe, name, None)) is not None}

    def tokenizer(self, encoder_name: str):
        """The tokenizer of a text encoder: ``tokenizer`` for ``text_encoder``, ``tokenizer_2`` for ``text_encoder_2``."""
        return getattr(self.pipe, encoder_name.replace("text_encoder", "tokenizer"))

    def make_trainable(self) -> nn.Module:
        """The trained part: LoRAs per model, new rows per text encoder (or of the class table), or the models."""
        c, pipe = self.config, self.pipe
        models = {"unet": pipe.unet} | (self.text_models() if c.train_text_encoder else {})
        if c.method == "lora":
            return nn.ModuleDict({name: LoRA.create(m, c.rank, c.alpha, c.targets, name="finetune")
                                  for name, m in models.items()})
        if c.method == "full":
            return nn.ModuleDict({name: m.requires_grad_(True) for name, m in models.items()})
        if not self.sd:
            rows = nn.Parameter(self.initial_class_rows())
            self.new_labels = add_class_embedding(pipe.unet, rows)
            return nn.ParameterDict({"class_embedding": rows})
        rows = {}
        for name, encoder in self.text_models().items():
            tokenizer = self.tokenizer(name)
            rows[name] = nn.Parameter(self.initial_rows(tokenizer, encoder))
            tokenizer.add_token(c.token, c.vectors)
        return nn.ParameterDict(rows)

    def initial_rows(self, tokenizer, encoder) -> torch.Tensor:
        """(n, D): the init word's embedding, a row per token of it when it has n tokens, else their mean n times."""
        c, word = self.config, self.config.init_word or "*"
        tokenizer.check_new_token(c.token, c.vectors)
        ids = tokenizer.encode(word)
        if not ids:
            raise ValueError(f"--init-word {word!r} has no tokens")
        table = encoder.token_embedding.weight.detach()[ids].float()
        return (table if len(ids) == c.vectors else table.mean(0).expand(c.vectors, -1)).clone()

    def initial_class_rows(self) -> torch.Tensor:
        """(n, D): the row of class ``init_word`` (a label), or the mean of the class rows (not the null row)."""
        c, table = self.config, self.pipe.unet.class_embedding.weight.detach().float()
        classes = len(table) - 1
        if c.init_word is None:
            return table[:classes].mean(0).expand(c.vectors, -1).clone()
        if not c.init_word.isdigit() or int(c.init_word) >= classes:
            raise ValueError(f"--init-word for a class-conditional run is a class label 0 … {classes - 1}, "
                             f"got {c.init_word!r}")
        return table[int(c.init_word)].expand(c.vectors, -1).clone()

    def install(self, trainable: nn.Module) -> None:
        """Put ``trainable`` (the weights being trained, or their EMA) into the frozen pipeline."""
        method, pipe = self.config.method, self.pipe
        if method == "lora":
            for lora in getattr(self, "installed", {}).values():
                detach(lora)
            for name, lora in trainable.items():
                attach(getattr(pipe, name), lora)
        elif method == "full":
            for name, model in trainable.items():
                setattr(pipe, name, model)
        elif self.sd:
            for name, rows in trainable.items():
                getattr(pipe, name).set_extra_embeddings(rows)
        else:
            pipe.unet.class_embedding.set_rows(trainable["class_embedding"])
        self.installed = trainable

    @contextmanager
    def using(self, trainable: nn.Module):
        """The pipeline with ``trainable`` (e.g. the EMA weights) in place for the block, then the trained part again."""
        self.install(trainable)
        try:
            yield self.pipe
        finally:
            self.install(self.model)

    # --- data ---------------------------------------------------------------------------------------------
    def read_part(self, source: str, caption: str | None, instance: bool = False) -> Part:
        """Images at the resolution, in model space (VAE posteriors encoded once), with their captions or labels."""
        c, pipe = self.config, self.pipe
        channels = pipe.vae.config.in_channels if pipe.vae is not None else pipe.unet.config.in_channels
        images = load_captioned(source, c.resolution, channels, caption, c.limit)
        if len(images) < c.loop.batch_size:
            raise ValueError(f"--batch-size {c.loop.batch_size} is more than the {len(images)} images in {source}: "
                             "give a smaller --batch-size")
        index = torch.arange(len(images))
        data = ImageDataset(images.images, index, len(images), name=images.name)
        if pipe.vae is not None:
            data = encode_dataset(pipe.vae, data, device=self.device, batch_size=4, progress=self.progress)
        part = Part(data, self.captions(images, source, instance), self.labels(images, instance))
        if self.sd and not self.text_trains:
            with torch.no_grad():  # 32 captions at a time through the encoders
                states = [self.encode_text(part.captions[i:i + 32]) for i in range(0, len(part.captions), 32)]
            part.context = torch.cat([context for context, _ in states])
            part.pooled = None if states[0][1] is None else torch.cat([pooled for _, pooled in states])
        return part

    def captions(self, images: CaptionedImages, source: str, instance: bool) -> list[str]:
        """The captions, checked: textual inversion's must use the token (an empty one becomes "a photo of TOKEN");
        those longer than the text encoder's 77 tokens are counted and warned about once."""
        if not self.sd:
            return images.captions
        token, captions = self.config.token, images.captions
        if instance and self.config.method == "textual-inversion":
            captions = [text or f"a photo of {token}" for text in captions]
            lacking = [text for text in captions if token not in text]
            if lacking:
                raise ValueError(f"textual inversion learns {token} from captions that use it; {len(lacking)} of "
                                 f"{len(captions)} in {source} do not (e.g. {lacking[0]!r}): add it, or give "
                                 f"--caption 'a photo of {token}'")
        tokenizer = self.pipe.tokenizer or self.pipe.tokenizer_2
        if count := long_captions(captions, tokenizer):
            warnings.warn(f"{count} of {len(captions)} captions in {source} are longer than the text encoder's "
                          f"{tokenizer.max_length} tokens; it reads only their first {tokenizer.max_length - 2}",
                          stacklevel=2)
        return captions

    def labels(self, images: CaptionedImages, instance: bool) -> torch.Tensor | None:
        """Toy runs: the new class (textual inversion), the images' own labels, else the null label ∅."""
        num_classes = None if self.sd else self.pipe.unet.config.num_classes
        if num_classes is None:
            return None
        if instance and self.config.method == "textual-inversion":
            return torch.full((len(images),), self.new_labels[0])
        return images.labels if images.labels is not None else torch.full((len(images),), num_classes)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Captions → (context (B, 77, D), pooled (B, P) or None), as the pipeline reads a plain prompt (cut at 75
        tokens); with gradients when autograd records (trained text encoders or token rows)."""
        contexts, pooled = [], None
        for name, encoder in self.text_models().items():
            tokenizer = self.tokenizer(name)
            ids = torch.tensor([tokenizer.frame(tokenizer.encode(text)[: tokenizer.max_length - 2])
                                for text in captions], device=self.device)
            if name == "text_encoder_2":  # SDXL pools with its second encoder
                out = encoder.encode(ids)
                contexts.append(out.hidden)
                pooled = out.pooled
            else:
                contexts.append(encoder(ids))
        return torch.cat(contexts, dim=-1), pooled

    # --- one step -----------------------------------------------------------------------------------------
    def draw(self, part: Part, position: int, stream: int) -> tuple[torch.Tensor, Conditioning]:
        """Batch ``position`` of a part: x_0 (z_0 ~ q(z | x), scaled) and its conditioning."""
        c = self.config.loop
        index = epoch_indices(len(part.data), c.batch_size, position, c.seed + stream)
        x0, index = part.data.batch(index, self.generator)
        if not self.sd:
            labels = None if part.labels is None else part.labels[index].to(self.device)
            return x0.to(self.device), Conditioning(labels=labels)
        captions = [part.captions[i] for i in index.tolist()]
        if self.config.caption_dropout:  # classifier-free guidance's ∅ [Ho & Salimans 2022, Alg. 1]
            dropped = torch.rand(len(captions), generator=self.generator) < self.config.caption_dropout
            captions = ["" if drop else text for drop, text in zip(dropped.tolist(), captions)]
            context, pooled = self.encode_text(captions) if part.context is None or dropped.any() else \
                (part.context[index], None if part.pooled is None else part.pooled[index])
        elif part.context is not None:
            context, pooled = part.context[index], None if part.pooled is None else part.pooled[index]
        else:
            context, pooled = self.encode_text(captions)
        size_ids = None
        if self.pipe.unet.config.added_cond_dim:  # SDXL's micro-conditioning: original size, crop (0, 0), target size
            size_ids = torch.tensor([[self.config.resolution] * 2 + [0, 0] + [self.config.resolution] * 2],
                                    device=self.device, dtype=torch.float32).expand(len(index), -1)
        return x0.to(self.device), Conditioning(context=context, pooled=pooled, size_ids=size_ids)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.pipe.unet(x_t, t, cond.token, pooled=cond.pooled, size_ids=cond.size_ids)

    def micro_loss(self, position: int) -> torch.Tensor:
        """One batch's loss: the instance images', plus λ × the class images' with prior preservation."""
        c = self.config
        x0, cond = self.draw(self.data, position, 0)
        if self.prior is not None:
            x0_class, cond_class = self.draw(self.prior, position, 1)
            x0 = torch.cat([x0, x0_class])
            cond = Conditioning(**{name: None if a is None else torch.cat([a, getattr(cond_class, name)])
                                   for name, a in vars(cond).items()})
        loss = diffusion_loss(self.denoise, self.schedule, x0, prediction=self.prediction, cond=cond,
                              generator=self.generator, min_snr_gamma=c.min_snr_gamma)
        B = c.loop.batch_size
        return loss[:B].mean() + (c.prior_weight * loss[B:].mean() if self.prior is not None else 0)

    def loss(self) -> torch.Tensor:
        """The step's loss, the mean over ``grad_accum`` micro-batches. The loop backpropagates what this returns,
        so the first K−1 micro-batches' gradients g are taken here and carried on the last one's loss as
        θ·g − sg(θ·g): zero in value, g in gradient (sg: stop-gradient). Only one batch's activations live at once."""
        K, value, carried = self.config.grad_accum, 0.0, None
        params = [p for p in self.model.parameters() if p.requires_grad]
        for k in range(K):
            micro = self.micro_loss(self.step * K + k) / K
            if k == K - 1:
                break
            grads = torch.autograd.grad(micro, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            carried = grads if carried is None else [a + g for a, g in zip(carried, grads)]
            value = value + micro.detach()
        if carried is None:
            return micro
        ride = sum((p * g).sum() for p, g in zip(params, carried))
        return micro + value + (ride - ride.detach())

    def train_step(self) -> float:
        loss = super().train_step()
        minutes = self.config.sample_every_minutes
        if minutes and time.monotonic() - self.last_sample >= 60 * minutes and self.rank == 0:
            self.save_samples(self.out_dir / "samples" / f"step_{self.step:07d}.png")
            self.last_sample = time.monotonic()
        return loss

    @torch.no_grad()
    def save_samples(self, path: Path, progress: bool = False) -> None:
        """A grid from fixed seeds with the EMA weights: the sample prompt (SD) or the run's class (toy runs)."""
        c = self.config
        if not c.sample_n:
            return
        with self.using(self.ema.model) as pipe:
            if self.sd:
                x = pipe(self.sample_prompt, num_images_per_prompt=c.sample_n, num_inference_steps=c.sample_steps,
                         width=c.resolution, height=c.resolution, seed=c.loop.seed, progress=progress, output="tensor")
            else:
                label = None if self.data.labels is None else int(self.data.labels[0])
                label = None if label == pipe.unet.config.num_classes else label  # ∅: sampled unconditionally
                x = pipe(c.sample_n, num_inference_steps=c.sample_steps, seed=c.loop.seed, progress=progress,
                         class_label=label, output="tensor")
        save_grid(x, path, scale=1 if self.sd else 2)

    # --- what the run leaves --------------------------------------------------------------------------------
    def save(self) -> None:
        """The checkpoint, then the files to use (from the EMA weights), at every save."""
        super().save()
        if self.rank == 0:
            self.export()

    def export(self) -> list[Path]:
        """Write the run's product: lora.safetensors (+ pytorch_lora_weights.safetensors), embedding.safetensors,
        or model (.safetensors / folder / run directory like the input)."""
        c, out, ema = self.config, self.out_dir, self.ema.model
        if c.method == "lora":
            models = {name: getattr(self.pipe, name) for name in ema.keys()}
            sdxl = self.sd and self.pipe.config.family.startswith("sdxl")
            formats = ["kohya"] + (["diffusers"] if c.diffusers_format else [])
            names = {"kohya": "lora.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}
            return [save_lora(out / names[f], dict(ema.items()), models, f, sdxl) for f in formats]
        if c.method == "textual-inversion":
            rows = {name: rows.detach() for name, rows in ema.items()}
            if not self.sd:
                return [atomic_save_safetensors({"class_embedding": rows["class_embedding"].float().contiguous()},
                                                out / "embedding.safetensors", metadata={"checkpoint": c.checkpoint})]
            vectors = rows["text_encoder"] if len(rows) == 1 else \
                {"clip_l": rows["text_encoder"], "clip_g": rows["text_encoder_2"]}
            return [save_embedding(out / "embedding.safetensors", vectors)]
        with self.using(ema) as pipe:
            if not self.sd:
                return [self.save_run(out / "model")]
            if Path(c.checkpoint).is_file():
                return [save_single_file(pipe, out / "model.safetensors")]
            return [save_diffusers_folder(pipe, out / "model")]

    def save_run(self, folder: Path) -> Path:
        """A fully fine-tuned toy model as an ordinary ``ldm train`` run (the base run's config, these weights),
        for ``ldm sample`` and ``load_pipeline``; it holds no optimizer state to resume from."""
        state, config = read_run(self.config.checkpoint, "unet", "ldm train")
        ema = self.ema.model["unet"].state_dict()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save({"config": config, "step": state.get("step", 0) + self.step, "losses": [],
                     "model": self.model["unet"].state_dict(),
                     "ema": {"decay": self.ema.decay, "num_updates": self.ema.num_updates, "model": ema}},
                    folder / CHECKPOINT)
        atomic_save_json(config, folder / CONFIG)
        return folder

    def usage(self) -> str:
        """The closing line: what was written and how to use it."""
        c, out = self.config, self.out_dir
        base, prompt = c.checkpoint, self.sample_prompt
        if c.method == "lora":
            files = [out / "lora.safetensors"] + ([out / "pytorch_lora_weights.safetensors"] if c.diffusers_format else [])
            use = f"ldm txt2img --checkpoint {base} --lora {files[0]} --prompt {prompt!r}" if self.sd else \
                f"ldm sample {base} --lora {files[0]}"
            return f"wrote {', '.join(map(str, files))}; use it with `{use}` (or pipe.load_lora(path, scale))"
        if c.method == "textual-inversion":
            file = out / "embedding.safetensors"
            if self.sd:
                word = file.stem  # as A1111 names an embedding: by its file (rename the file to rename the word)
                return (f"wrote {file}; use it with `ldm txt2img --checkpoint {base} --embedding {file} --prompt "
                        f"{prompt.replace(c.token, word)!r}` (the word is the file's name), or as {c.token} with "
                        f"pipe.load_embedding(path, token={c.token!r})")
            return (f"wrote {file} (a new class, label {self.new_labels[0]}); use it with `ldm sample {base} --embedding "
                    f"{file}` (or ldm.class_embedding.add_class_embedding(pipe.unet, load_class_embedding(path)))")
        model = next(p for p in (out / "model.safetensors", out / "model") if p.exists())
        use = f"ldm txt2img --checkpoint {model} --prompt {prompt!r}" if self.sd else f"ldm sample {model}"
        return f"wrote {model}; use it with `{use}`"


def finetune(config: FinetuneConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
             device: str | None = None, progress: bool = True, pipe=None) -> Finetuner:
    """Build a ``Finetuner`` and train to the budget (``resume`` continues the run in ``out_dir``, ``overwrite``
    starts it over; an existing run is refused without one of them)."""
    return Finetuner(config, out_dir, device=device, progress=progress, pipe=pipe).fit(resume, overwrite)


__all__ = ["DEFAULT_BATCH", "DEFAULT_LR", "FinetuneConfig", "Finetuner", "METHODS", "finetune"]
