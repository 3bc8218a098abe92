"""The text-conditional UNet every player is made of (teacher, generator, fake score)."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DConditionModel

from ..config import TeacherParams, UNetParams


def build_unet(cfg: UNetParams, sample_size: int, channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type=cfg.addition_embed_type,
    )


def build_noise_scheduler(params: TeacherParams) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=params.num_train_timesteps, beta_schedule=params.beta_schedule,
                         prediction_type="epsilon", clip_sample=False)


def load_unet(path: str, subfolder: str | None = None) -> UNet2DConditionModel:
    """A saved UNet from a local directory or hub id (`subfolder="unet"` for a full SD pipeline)."""
    return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder)
