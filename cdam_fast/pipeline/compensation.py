"""CLIPer's fine-grained compensation: Stable Diffusion self-attention as a propagation matrix.

One UNet forward per image (empty prompt, latents of the image noised to a low-noise timestep
with seeded noise) yields the self-attention probabilities of two full-resolution (64 x 64
latent, 4096-token) self-attention layers of the last up block: 2 layers x 5 heads = 10 maps
[4096, 4096] for SD 2.1-base. Each map is divided by its column maxima (+1e-5), entries below
the threshold are zeroed, rows are normalised (+1e-5), and the maps are chained:
R = A_0 A_1 ... A_9. The CLIPer map, resized to the latent grid, becomes R @ map. CLIPer's
public code forms R (nine 4096^3 products); here R is never formed: R @ X = A_0 (A_1 (... (A_9 X)))
costs ten [4096, 4096] x [4096, C] products instead (same result up to rounding).

Weights come only from a local diffusers folder (unet/, vae/, scheduler/, and text_encoder/ +
tokenizer/ for the empty-prompt embedding, which needs `transformers`); nothing is downloaded.
Install with the `sd` extra: pip install 'cdam-fast[sd]'.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..validation import CdamInputError

SD_EXTRA_HINT = "pip install 'cdam-fast[sd]' (diffusers, transformers)"
SD_SIZE = 512  # the UNet sees the image at 512 x 512 (64 x 64 latents)
SD_STEPS, SD_TIMESTEP_INDEX = 50, 45  # timesteps[45] of a 50-step schedule: low noise
SD_UP_ATTENTIONS = (1, 0)  # CLIPer's layers -4, -6: attn1 of attentions[1], then [0], of the last up block
_EPS = 1e-5


def import_extra(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(f"compensation 'sd' needs {name}: {SD_EXTRA_HINT}") from e


class _CaptureProcessor:
    """diffusers attention processor: the standard computation, keeping the probabilities of
    the first batch element as [heads, queries, keys] float32."""

    def __init__(self, store: dict, key: str):
        self.store, self.key = store, key

    @torch.inference_mode()
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store[self.key] = probs.reshape(-1, attn.heads, *probs.shape[1:])[0].float()
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def check_sd_weights(weights) -> Path:
    """The local diffusers folder, checked (cheap: before any model is loaded)."""
    if weights is None:
        raise CdamInputError("compensation 'sd' needs sd_weights (--sd-weights PATH): a local diffusers folder of "
                             "Stable Diffusion 2.1-base (unet/, vae/, scheduler/, text_encoder/, tokenizer/); "
                             "weights are never downloaded at run time")
    path = Path(weights).expanduser()
    if not path.is_dir():
        raise CdamInputError(f"sd_weights: {str(path)!r} is not a folder (expected a local diffusers folder of "
                             "Stable Diffusion 2.1-base with unet/, vae/, scheduler/)")
    for sub in ("unet", "vae", "scheduler"):
        if not (path / sub).is_dir():
            raise CdamInputError(f"sd_weights: {str(path / sub)!r} is missing (expected a diffusers folder with "
                                 "unet/, vae/, scheduler/)")
    return path


def empty_prompt_embedding(path: Path) -> torch.Tensor:
    """[1, 77, D]: the text encoder's last hidden state for the empty prompt (as diffusers'
    encode_prompt gives it for SD 2.x without CLIP skip)."""
    transformers = import_extra("transformers")
    for sub in ("text_encoder", "tokenizer"):
        if not (path / sub).is_dir():
            raise CdamInputError(f"sd_weights: {str(path / sub)!r} is missing (needed for the empty-prompt embedding)")
    tok = transformers.CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    enc = transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True).eval()
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return enc(ids.input_ids)[0].float()


class SdCompensation:
    """CLIPer's fine-grained compensation with a local Stable Diffusion folder.

    threshold: CLIPer's attention threshold (its configs use the propagation threshold: 0.1 VOC,
    0.2 otherwise). seed: the noise added to the latents. size: the UNet's input side (512 for
    SD 2.1-base; smaller only for tests). prompt_embeds: the empty-prompt embedding [1, S, D]
    (default: computed once with the folder's text encoder). dtype: UNet / VAE dtype (default
    fp16 on CUDA, fp32 on CPU). layers: module names of the self-attention layers (default:
    attn1 of attentions 1 then 0 of the last up block).
    """

    def __init__(self, weights, device, *, threshold: float = 0.1, seed: int = 0, size: int = SD_SIZE,
                 steps: int = SD_STEPS, timestep_index: int = SD_TIMESTEP_INDEX, prompt_embeds=None, dtype=None,
                 layers=None):
        path = check_sd_weights(weights)
        diffusers = import_extra("diffusers")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise CdamInputError(f"sd seed must be an integer, got {seed!r}")
        if not 0 <= timestep_index < steps:
            raise CdamInputError(f"timestep_index must lie in [0, {steps}), got {timestep_index!r}")
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.threshold, self.seed, self.size = float(threshold), seed, int(size)
        self.steps, self.timestep_index = steps, timestep_index
        load = dict(local_files_only=True, torch_dtype=self.dtype)
        try:
            self.unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load)
            self.vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
            config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            self.scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(path, subfolder="scheduler")
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CdamInputError(f"sd_weights: cannot load Stable Diffusion from {str(path)!r} ({e})") from e
        self.unet.to(self.device).eval()
        self.vae.to(self.device).eval()
        if prompt_embeds is None:
            prompt_embeds = empty_prompt_embedding(path)
        self.prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.size % self.scale_factor:
            raise CdamInputError(f"sd size {self.size} is not a multiple of the VAE's factor {self.scale_factor}")
        last = len(self.unet.up_blocks) - 1
        self.layers = tuple(layers or (f"up_blocks.{last}.attentions.{i}.transformer_blocks.0.attn1"
                                       for i in SD_UP_ATTENTIONS))
        self._maps: dict = {}
        modules = dict(self.unet.named_modules())
        for name in self.layers:
            if name not in modules:
                raise CdamInputError(f"sd layer {name!r} is not a module of the UNet")
            modules[name].set_processor(_CaptureProcessor(self._maps, name))

    @property
    def grid(self) -> int:
        """Side of the latent grid the maps are propagated on (64 for SD at 512)."""
        return self.size // self.scale_factor

    @torch.inference_mode()
    def attention_maps(self, image: torch.Tensor) -> torch.Tensor:
        """image [3, H, W] in [0, 1] -> the chosen layers' self-attention maps [layers * heads,
        P, P] (float32, P = grid^2), in chain order."""
        x = F.interpolate(image[None].float(), size=(self.size, self.size), mode="nearest") * 2 - 1
        x = x.to(self.device, self.dtype)
        latents = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        self.scheduler.set_timesteps(self.steps, device=self.device)
        t = self.scheduler.timesteps[self.timestep_index]
        g = torch.Generator().manual_seed(self.seed)  # CPU generator: the same noise on every device
        noise = torch.randn(latents.shape, generator=g).to(self.device, latents.dtype)
        noisy = self.scheduler.add_noise(latents, noise, t.reshape(1))
        self._maps.clear()
        self.unet(noisy, t, encoder_hidden_states=self.prompt_embeds.expand(noisy.shape[0], -1, -1))
        return torch.cat([self._maps[name] for name in self.layers])

    @torch.inference_mode()
    def propagate(self, maps: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """maps [C, p, p] (p = grid) and attention [n, P, P] -> R @ maps per class, where R is
        the chain of the thresholded, row-normalised attention maps (attention is modified)."""
        A = attention
        A.div_(A.amax(dim=-2, keepdim=True) + _EPS)
        A.masked_fill_(A < self.threshold, 0.0)
        A.div_(A.sum(dim=-1, keepdim=True) + _EPS)
        C = maps.shape[0]
        X = maps.reshape(C, -1).T.to(A.dtype)  # [P, C]
        for a in reversed(A):  # A_0 (A_1 (... (A_{n-1} X)))
            X = a @ X
        return X.T.reshape(maps.shape).to(maps.dtype)

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """image [3, H, W] in [0, 1], maps [C, grid, grid] -> compensated maps [C, grid, grid]."""
        return self.propagate(maps.to(self.device), self.attention_maps(image))
