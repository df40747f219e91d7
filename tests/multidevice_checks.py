"""Runs in a child process with 8 simulated CPU devices (``tests/test_parallel.py`` sets
XLA_FLAGS): trains a tiny DiT a few steps on one device and on several meshes, and prints
one JSON object with what the tests compare."""

import json
import sys

import jax
import numpy as np
import optax
from flax import nnx

from sora_jax.models.dit import DiT
from sora_jax.parallel.mesh import create_mesh
from sora_jax.parallel.sharding import param_bytes_per_device, state_shardings
from sora_jax.train.steps import dit_loss_fn
from sora_jax.train.trainer import TrainStep

import ml_collections

STEPS = 3
# pure data parallelism is data2 x context4's data axis; each mesh costs a compile (~10 s)
MESHES = {
    "fsdp8": dict(fsdp=8),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "data2_context4": dict(data=2, context=4),
}


def batch(step: int) -> dict:
    """8 packed rows of 64 tokens: 2-3 examples per row, with padding, text per segment."""
    rng = np.random.default_rng(step)
    b, l, lt, d = 8, 64, 16, 16
    seg = np.zeros((b, l), np.int32)
    tseg = np.zeros((b, lt), np.int32)
    pos = np.zeros((b, l, 3), np.int32)
    for r in range(b):
        cuts = sorted(rng.choice(np.arange(8, 56), 2, replace=False))
        seg[r, :cuts[0]], seg[r, cuts[0]:cuts[1]], seg[r, cuts[1]:60] = 1, 2, 3
        tseg[r, :5], tseg[r, 5:9], tseg[r, 9:12] = 1, 2, 3
        pos[r, :, 0] = np.arange(l) // 16
        pos[r, :, 1] = (np.arange(l) // 4) % 4
        pos[r, :, 2] = np.arange(l) % 4
    return dict(tokens=rng.standard_normal((b, l, d)).astype(np.float32), segment_ids=seg,
                positions=pos, text=rng.standard_normal((b, lt, 32)).astype(np.float32),
                text_segment_ids=tseg, loss_mask=(seg > 0).astype(np.float32))


def run(mesh_sizes, scan=False):
    model = DiT(in_dim=16, hidden_size=64, depth=2, num_heads=4, text_dim=32, scan_layers=scan,
                remat=scan, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    flow = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=1.0, base_tokens=48, max_shift=3.0,
                                          caption_dropout=0.1, loss_weighting="per_token"))
    mesh = None if mesh_sizes is None else create_mesh(dict(ici=mesh_sizes))
    step = TrainStep(model, opt, dit_loss_fn(flow), lambda s: 1e-3, seed=0, mesh=mesh)
    losses = [float(step(batch(i), i)["loss"]) for i in range(STEPS)]
    step.sync()
    params = {jax.tree_util.keystr(p): np.asarray(v.get_value())
              for p, v in jax.tree_util.tree_flatten_with_path(
                  nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
    out = {"losses": losses, "params": params}
    if mesh is not None:
        state = nnx.state(model, nnx.Param)
        sh = state_shardings(state, mesh, None or __import__("sora_jax.parallel.axes", fromlist=["x"]).DEFAULT_RULES)
        out["bytes"] = param_bytes_per_device(state, sh)
        kernel = (model.blocks if scan else model.blocks[0]).mlp.fc1.kernel.get_value()
        out["fc1_spec"] = str(kernel.sharding.spec)
    return out


def context_attention_checks() -> dict:
    """Context-parallel attention vs. one device: values and gradients, self and cross."""
    import jax.numpy as jnp

    from sora_jax.models import context_parallel as context
    from sora_jax.models.attention import dot_product_attention
    from sora_jax.parallel.sharding import activate

    rng = np.random.default_rng(1)
    b, l, lt, h, dh = 2, 64, 8, 4, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, l, h, dh)), jnp.float32) for _ in range(3))
    tk, tv = (jnp.asarray(rng.standard_normal((b, lt, h, dh)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 30 + [3] * 10 + [0] * 4], b, 0), jnp.int32)
    tseg = jnp.asarray(np.repeat([[0, 1, 1, 2, 2, 2, 3, 0]], b, 0), jnp.int32)
    always = jnp.zeros((b, lt), bool).at[:, 0].set(True)
    out = {}
    for backend in ("xla", "chunked"):
        def self_attn(q, k, v, fn):
            return fn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, backend=backend,
                      **({"gather_kv": True} if fn is context.attention else {}))

        def cross_attn(q, k, v, fn):
            return fn(q, k, v, q_segment_ids=seg, kv_segment_ids=tseg, kv_always_visible=always,
                      backend=backend, **({"gather_kv": False} if fn is context.attention else {}))

        for name, f, kk, vv in (("self", self_attn, k, v), ("cross", cross_attn, tk, tv)):
            def loss(q, k, v, fn):
                return jnp.sum(jnp.sin(f(q, k, v, fn)))

            ref_val = f(q, kk, vv, dot_product_attention)
            ref_grad = jax.grad(loss, argnums=(0, 1, 2))(q, kk, vv, dot_product_attention)
            mesh = create_mesh(dict(ici=dict(context=8)))
            with activate(mesh, __import__("sora_jax.parallel.axes", fromlist=["x"]).DEFAULT_RULES):
                fn = jax.jit(lambda q, k, v: (f(q, k, v, context.attention),
                                              jax.grad(loss, argnums=(0, 1, 2))(q, k, v, context.attention)))
                hlo = fn.lower(q, kk, vv).compile().as_text()
                val, grad = fn(q, kk, vv)
            out[f"{name}_{backend}"] = {
                "value_diff": float(jnp.max(jnp.abs(val - ref_val))),
                "grad_diff": max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(grad, ref_grad)),
                "all_gather": "all-gather" in hlo,
                "out_spec": str(val.sharding.spec),
            }
    return out


def create_sharded_check() -> dict:
    """A scanned DiT initialised on its shards (fsdp 4 x tensor 2) vs. the eager build."""
    from sora_jax.parallel.axes import DEFAULT_RULES
    from sora_jax.parallel.sharding import create_sharded

    def build():
        return DiT(in_dim=16, hidden_size=64, depth=2, num_heads=4, text_dim=32, scan_layers=True,
                   rngs=nnx.Rngs(0))

    mesh = create_mesh(dict(ici=dict(fsdp=4, tensor=2)))
    sharded, eager = create_sharded(build, mesh, DEFAULT_RULES), build()
    pairs = list(zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(nnx.state(eager, nnx.Param))))
    kernel = sharded.blocks.mlp.fc1.kernel.get_value()
    return {"max_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs),
            "fc1_spec": str(kernel.sharding.spec),
            "fc1_shard_shape": list(kernel.addressable_shards[0].data.shape)}


def wan_import_check() -> dict:
    """import-weights of the tiny Wan folder onto an fsdp 4 x tensor 2 mesh vs. on one device:
    the same checkpoints, with the parameters placed on their shards on the way."""
    import pathlib
    import tempfile

    from sora_jax.interop.diffusers_import import import_diffusers
    from sora_jax.models.factory import build_dit
    from sora_jax.train.run_folder import read_config, restore

    tiny = pathlib.Path(__file__).parent / "fixtures" / "wan" / "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        plain = import_diffusers(tiny, f"{tmp}/plain")
        sharded = import_diffusers(tiny, f"{tmp}/sharded", mesh=create_mesh(dict(ici=dict(fsdp=4, tensor=2))))
        models = []
        for name in ("plain", "sharded"):
            m = build_dit(read_config(f"{tmp}/{name}"))
            restore(m, f"{tmp}/{name}/dit", "dit")
            models.append(m)
        pairs = zip(*(jax.tree.leaves(nnx.state(m, nnx.Param)) for m in models))
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
    return {"max_diff": diff, "sharded_params": {k: c["sharded_params"] for k, c in sharded["components"].items()},
            "plain_sharded_params": {k: c["sharded_params"] for k, c in plain["components"].items()}}


def wan_export_check() -> dict:
    """export --format safetensors of an imported tiny Wan run restored onto an fsdp 4 x tensor 2
    mesh (``shard=True``) vs. on one device: the same files, tensor for tensor, with the
    restored parameters split over the devices."""
    import pathlib
    import tempfile

    from safetensors.numpy import load_file

    from sora_jax.interop.diffusers_import import import_diffusers
    from sora_jax.interop.export import export_run
    from sora_jax.interop.run_weights import load_run_models
    from sora_jax.train.run_folder import read_config

    tiny = pathlib.Path(__file__).parent / "fixtures" / "wan" / "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        import_diffusers(tiny, f"{tmp}/run")
        cfg = read_config(f"{tmp}/run")
        cfg.mesh.ici = dict(data=1, fsdp=4, context=1, tensor=2)
        export_run(cfg, f"{tmp}/run", "safetensors", f"{tmp}/plain")
        export_run(cfg, f"{tmp}/run", "safetensors", f"{tmp}/sharded", shard=True)
        mesh = create_mesh(cfg.mesh)
        models = load_run_models(cfg, f"{tmp}/run", mesh=mesh, rules=cfg.mesh.rules)
        split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(nnx.state(models["dit"].model)))
        same, files = True, 0
        plain = pathlib.Path(tmp, "plain")
        for f in sorted(plain.rglob("*.safetensors")):
            a, b = load_file(str(f)), load_file(str(pathlib.Path(tmp, "sharded", f.relative_to(plain))))
            same &= set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
            files += 1
    return {"same_tensors": bool(same), "files": files, "sharded_dit_arrays": int(split)}


def main():
    ref = run(None)
    result = {"devices": jax.device_count(), "reference_losses": ref["losses"], "meshes": {},
              "context_attention": context_attention_checks()}
    for name, sizes in MESHES.items():
        got = run(sizes)
        diff = max(float(np.max(np.abs(got["params"][k] - ref["params"][k]))) for k in ref["params"])
        result["meshes"][name] = {"losses": got["losses"], "max_param_diff": diff,
                                  "param_fraction": got["bytes"]["max_per_device"] / got["bytes"]["total"],
                                  "fc1_spec": got["fc1_spec"]}
    # scanned layers (stacked parameters with a leading "layers" axis) under FSDP + tensor
    ref_scan, got = run(None, scan=True), run(dict(fsdp=4, tensor=2), scan=True)
    result["scan_fsdp4_tensor2"] = {
        "reference_losses": ref_scan["losses"], "losses": got["losses"], "fc1_spec": got["fc1_spec"],
        "max_param_diff": max(float(np.max(np.abs(got["params"][k] - ref_scan["params"][k])))
                              for k in ref_scan["params"])}
    result["create_sharded"] = create_sharded_check()
    result["wan_import"] = wan_import_check()
    result["wan_export"] = wan_export_check()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
