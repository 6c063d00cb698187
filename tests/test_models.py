"""Models: output shapes, per-example independence (the DP-SGD requirement), parameter
counts, validation, and pretrained-weight conversion and loading.

Compilation dominates on CPU, so parameters come from ``jax.eval_shape`` filled with
host-side random numbers (no compiled initialiser) and each model compiles two small
functions only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdp.models import (
    MODELS, ResNet, ResNetBackbone, fold_batchnorm, from_torchvision, get_model, load_params,
    merge_params, save_params,
)
from patchdp.models.pspnet import adaptive_avg_pool


def param_shapes(model, image_shape=(1, 32, 32, 3)):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape, jnp.float32))


def random_params(model, image_shape=(1, 32, 32, 3), seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype), param_shapes(model, image_shape))


def num_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


TINY = {  # name -> options giving a fast model of the same architecture
    "unet": dict(width=4),
    "deeplabv3plus": dict(backbone_depth=18, backbone_width=4, features=8, low_level_features=4),
    "pspnet": dict(backbone_depth=18, backbone_width=4, features=8),
    "resnet18": dict(width=4),
    "vgg11": dict(width=4),
    "cnn": dict(width=4),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_shapes_and_no_cross_example_dependence(name):
    """Batched output = the outputs of single examples under vmap (how per-example
    gradients are taken): example i depends on example i alone, and a batch of one works."""
    model = get_model(name, 3, **TINY[name])
    params = random_params(model)
    images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
    batched = jax.jit(model.apply)(params, images)
    single = jax.jit(jax.vmap(lambda x: model.apply(params, x[None])[0]))(images)
    expected = (3, 32, 32, 3) if model.task == "segmentation" else (3, 3)
    assert batched.shape == expected and batched.dtype == jnp.float32
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)
    assert not np.allclose(batched[0], batched[1], atol=1e-3), "output does not depend on the input"


def test_every_registered_model_is_tested_or_a_preset():
    tested_classes = {type(get_model(n, 2)) for n in TINY}
    assert {type(get_model(n, 2)) for n in MODELS} == tested_classes


@pytest.mark.parametrize("name, classes, low, high", [
    ("unet", 5, 100_000, 130_000),
    ("cnn", 10, 20_000, 30_000),
    ("vgg11", 10, 9_000_000, 9_500_000),
    ("vgg16", 10, 14_000_000, 15_000_000),
    ("deeplabv3plus", 19, 38_000_000, 42_000_000),
    ("pspnet", 19, 44_000_000, 48_000_000),
])
def test_param_counts_at_default_size(name, classes, low, high):
    shapes = param_shapes(get_model(name, classes), (1, 64, 64, 3))
    assert set(shapes) == {"params"}, "models must hold no state besides params"
    assert low <= num_params(shapes) <= high


@pytest.mark.parametrize("depth, torchvision_count", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
                                                      (101, 44_549_160)])
def test_resnet_matches_torchvision_param_count(depth, torchvision_count):
    for norm in ("group", "affine"):
        assert num_params(param_shapes(get_model(f"resnet{depth}", 1000, norm=norm), (1, 64, 64, 3))) == torchvision_count


@pytest.mark.parametrize("stem, output_stride, strides", [
    ("imagenet", None, (4, 8, 16, 32)), ("imagenet", 16, (4, 8, 16, 16)), ("imagenet", 8, (4, 8, 8, 8)),
    ("small", None, (1, 2, 4, 8)),
])
def test_backbone_stage_strides(stem, output_stride, strides):
    backbone = ResNetBackbone(depth=50, width=4, stem=stem, output_stride=output_stride)
    stages, _ = jax.eval_shape(backbone.init_with_output, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert [64 // s.shape[1] for s in stages] == list(strides)
    assert [s.shape[-1] for s in stages] == [16, 32, 64, 128]  # 4 · width · 2^k (bottleneck)


@pytest.mark.parametrize("call, message", [
    (lambda: get_model("unet2", 3), "unknown model"),
    (lambda: get_model("unet", 3, depth=4), "no option"),
    (lambda: get_model("unet", 0), "num_classes"),
    (lambda: get_model("cnn", 3, norm="batch"), "norm"),
    (lambda: get_model("resnet18", 3, depth=19), "depth"),
    (lambda: get_model("deeplabv3plus", 3, output_stride=32), "output_stride"),
    (lambda: ResNetBackbone(stem="small", output_stride=32), "output_stride"),
    (lambda: get_model("vgg11", 3, stages=()), "stages"),
])
def test_invalid_configurations_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_adaptive_avg_pool_matches_pytorch_bins():
    x = np.random.default_rng(0).normal(size=(1, 7, 5, 2)).astype(np.float32)
    pooled = adaptive_avg_pool(jnp.asarray(x), 3)
    for i in range(3):
        for j in range(3):  # PyTorch: bin i covers [floor(i n / b), ceil((i + 1) n / b))
            rows = slice(i * 7 // 3, -(-(i + 1) * 7 // 3))
            cols = slice(j * 5 // 3, -(-(j + 1) * 5 // 3))
            np.testing.assert_allclose(pooled[0, i, j], x[0, rows, cols].mean(axis=(0, 1)), rtol=1e-5)


def test_fold_batchnorm_is_batchnorm_in_inference_mode():
    rng = np.random.default_rng(0)
    gamma, beta, mean = rng.normal(size=(3, 4))
    var = rng.uniform(0.5, 2.0, 4)
    x = rng.normal(size=(10, 4))
    folded = fold_batchnorm(gamma, beta, mean, var, eps=1e-5)
    np.testing.assert_allclose(x * folded["scale"] + folded["shift"],
                               gamma * (x - mean) / np.sqrt(var + 1e-5) + beta, rtol=1e-5, atol=1e-6)


def torchvision_resnet18_state_dict(width, rng):
    """Random arrays under torchvision's ResNet-18 names and (O, I, kh, kw) layouts."""
    sd = {}

    def conv(name, out, inp, k):
        sd[f"{name}.weight"] = rng.normal(size=(out, inp, k, k)).astype(np.float32)

    def bn(name, c):
        sd.update({f"{name}.weight": rng.normal(size=c), f"{name}.bias": rng.normal(size=c),
                   f"{name}.running_mean": rng.normal(size=c), f"{name}.running_var": rng.uniform(0.5, 2, c),
                   f"{name}.num_batches_tracked": np.array(7)})

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    channels = width
    for stage in range(4):
        c = width * 2**stage
        for block in range(2):
            p = f"layer{stage + 1}.{block}"
            conv(f"{p}.conv1", c, channels if block == 0 else c, 3)
            bn(f"{p}.bn1", c)
            conv(f"{p}.conv2", c, c, 3)
            bn(f"{p}.bn2", c)
            if block == 0 and stage > 0:
                conv(f"{p}.downsample.0", c, channels, 1)
                bn(f"{p}.downsample.1", c)
        channels = c
    sd["fc.weight"], sd["fc.bias"] = rng.normal(size=(1000, channels)), rng.normal(size=1000)
    return sd


def test_from_torchvision_fits_an_affine_resnet_and_not_a_groupnorm_one(tmp_path):
    sd = torchvision_resnet18_state_dict(4, np.random.default_rng(0))
    converted = from_torchvision(sd)
    model = ResNet(10, width=4, norm="affine")
    shapes = param_shapes(model)["params"]
    assert jax.tree.structure(converted["backbone"]) == jax.tree.structure(shapes["backbone"])
    kernel = converted["backbone"]["layer2_0"]["shortcut"]["conv"]["kernel"]
    assert kernel[0, 0, 1, 2] == sd["layer2.0.downsample.0.weight"][2, 1, 0, 0]

    path = tmp_path / "resnet18.msgpack"
    save_params(path, converted)
    params = merge_params(random_params(model)["params"], load_params(path))
    np.testing.assert_array_equal(params["backbone"]["stem"]["conv"]["kernel"],
                                  converted["backbone"]["stem"]["conv"]["kernel"])
    assert params["head"]["kernel"].shape == (32, 10)  # new head kept from init
    with pytest.raises(ValueError, match="norm='affine'"):
        merge_params(random_params(ResNet(10, width=4))["params"], converted)
    deeplab = get_model("deeplabv3plus", 3, backbone_depth=18, backbone_width=4, backbone_norm="affine")
    assert jax.tree.structure(param_shapes(deeplab)["params"]["backbone"]) == jax.tree.structure(converted["backbone"])


@pytest.mark.parametrize("suffix", [".npz", ".msgpack"])
def test_params_round_trip_through_files(tmp_path, suffix):
    params = {"a": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)}, "b": {"bias": np.ones(2, np.float32)}}
    save_params(tmp_path / f"p{suffix}", params)
    loaded = load_params(tmp_path / f"p{suffix}")
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_loading_and_merging_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_params(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=".msgpack"):
        save_params(tmp_path / "p.pt", {})
    params = {"a": {"kernel": np.zeros((2, 3))}}
    with pytest.raises(ValueError, match=r"a/kernel: shape \(3, 2\)"):
        merge_params(params, {"a": {"kernel": np.zeros((3, 2))}})
    with pytest.raises(ValueError, match="a/bias: not in the model"):
        merge_params(params, {"a": {"bias": np.zeros(3)}})
