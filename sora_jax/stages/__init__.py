"""The pipeline's stages, each a function of (config, run folder): what the CLI subcommands run.

One module per stage group, in pipeline order: :mod:`.data` (prepare-data), :mod:`.vae`
(train-vae, evaluate-vae), :mod:`.dit` (latent encoding, train-dit), :mod:`.sampling`
(evaluate, the prompt modes), :mod:`.quickstart` (all of them); released weights come in through
:mod:`sora_jax.interop` (import-weights) and go out through it (export). The run folder's layout is
:mod:`sora_jax.train.run_folder`'s; models come from :mod:`sora_jax.models.factory`.
"""

from sora_jax.inference.samples import generate_samples as generate
from sora_jax.interop.diffusers_import import import_weights
from sora_jax.interop.export import export_command as export
from sora_jax.models.info import model_info
from sora_jax.stages.data import prepare_data
from sora_jax.stages.dit import dit_heldout_loss, dit_sources, encode_latents, train_dit
from sora_jax.stages.quickstart import quickstart, summary_line
from sora_jax.stages.sampling import DEMO_MODES, evaluate, heldout_prompts, prompt_modes
from sora_jax.stages.vae import evaluate_vae, train_vae
from sora_jax.train.aot import aot_compile

__all__ = ["DEMO_MODES", "aot_compile", "dit_heldout_loss", "dit_sources", "encode_latents",
           "evaluate", "evaluate_vae", "export", "generate", "heldout_prompts", "import_weights", "model_info",
           "prepare_data", "prompt_modes", "quickstart", "summary_line", "train_dit", "train_vae"]
