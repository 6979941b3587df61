"""enable_model_cpu_offload and enable_sequential_cpu_offload, run on the CPU with device="cpu" (and, for where
the weights are during each stage, with the meta device standing in for an accelerator): the same images as
without offload, where the weights are between and during uses, no second read of the weight files, and the
refusals (no accelerator, `.to(device)` while offloading, low-memory mode)."""

import contextlib

import pytest
import torch

import wurst
import wurst.weights.cast_copies
import wurst.weights.safetensors_io
from tests.helpers import PROMPT

METHODS = ["enable_model_cpu_offload", "enable_sequential_cpu_offload"]
RUN = dict(height=128, width=128, prior_num_inference_steps=3, num_inference_steps=2, output_type="pt",
           negative_prompt="blurry", decoder_guidance_scale=2.0)
MODELS = ("prior_text_encoder", "prior_prior", "text_encoder", "decoder", "vqgan")  # in the order they run
# Where each combined-pipeline component lives: (pipe attribute, model attribute in that pipe).
HOMES = {name: ("prior_pipe", name.removeprefix("prior_")) if name.startswith("prior_") else ("decoder_pipe", name)
         for name in MODELS}


@pytest.fixture(scope="module")
def repos(tiny_prior_repo, tiny_decoder_repo):
    return tiny_prior_repo, tiny_decoder_repo


def load(repos, **kwargs):
    prior, decoder = repos
    pipe = wurst.WuerstchenCombinedPipeline.from_pretrained(decoder, prior_repo=prior, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(3), **RUN).images


@pytest.fixture(scope="module")
def expected(repos):
    return run(load(repos))


def tensors(module):
    return [*module.parameters(), *module.buffers()]


def devices(pipe, name):
    return {t.device.type for t in tensors(getattr(pipe, name))}


def masters(pipe, name):
    """The CPU copies an offloaded model's weights are kept in, by module name and tensor name."""
    pipe_name, model_name = HOMES[name]
    offloaded = getattr(pipe, pipe_name).placement.offloaded[model_name]
    names = {module: prefix for prefix, module in offloaded.module.named_modules()}
    return {f"{names[module]}.{n}".lstrip("."): t for module, own in offloaded.home.items() for n, t in own.items()}


# ---------------------------------------------------------------------------------------------------------
# The same images, no second read of the weight files


@pytest.mark.parametrize("method", METHODS)
def test_offload_on_cpu_gives_the_same_images_without_reading_files_again(method, repos, expected, monkeypatch):
    pipe = load(repos)
    getattr(pipe, method)(device="cpu")
    assert pipe.prior_pipe._execution_device == pipe.decoder_pipe._execution_device == torch.device("cpu")

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(wurst.weights.safetensors_io, "read_safetensors", no_reading)
    with pytest.raises(AssertionError, match="read again"):  # the patch is where loading looks
        load(repos)
    assert torch.equal(run(pipe), expected)
    assert torch.equal(run(pipe), expected)  # and again: the first run left the weights as they were


def test_switching_offload_mode(repos, expected):
    pipe = load(repos)
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert all(devices(pipe, name) == {"meta"} for name in MODELS)
    assert torch.equal(run(pipe), expected)
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(devices(pipe, name) == {"cpu"} for name in MODELS)
    assert torch.equal(run(pipe), expected)


# ---------------------------------------------------------------------------------------------------------
# Where the weights are


def test_sequential_offload_parks_weights_on_meta_and_keeps_cpu_masters(repos, expected):
    """Between calls every weight is on the meta device and the CPU masters equal the checkpoint; while a layer
    runs, its own weights are on the execution device and every layer that is neither it nor one of its
    enclosing modules is parked."""
    pipe = load(repos)
    fresh = load(repos)
    pipe.enable_sequential_cpu_offload(device="cpu")

    def check_masters():
        for name in MODELS:
            assert devices(pipe, name) == {"meta"}, name
            model = getattr(fresh, name)
            state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            kept = masters(pipe, name)
            assert set(kept) == set(state), name
            assert all(t.device.type == "cpu" and torch.equal(t, state[n]) for n, t in kept.items()), name

    check_masters()
    modules = {f"{name}.{sub_name}".rstrip("."): sub for name in MODELS
               for sub_name, sub in getattr(pipe, name).named_modules()}
    owners = {name: module for name, module in modules.items() if module._parameters or module._buffers}
    seen, problems = set(), []

    def check(name):
        def hook(module, args, output):
            if name in seen:
                return
            seen.add(name)
            if any(t.device.type != "cpu" for t in [*module.parameters(False), *module.buffers(False)]):
                problems.append(f"{name} ran without its weights")
            for other, owner in owners.items():
                enclosing = name.startswith(other + ".")
                if other != name and not enclosing and any(t.device.type != "meta" for t in tensors(owner)):
                    problems.append(f"{other} holds weights while {name} runs")

        return hook

    hooks = [module.register_forward_hook(check(name)) for name, module in owners.items()]
    try:
        assert torch.equal(run(pipe), expected)
    finally:
        for hook in hooks:
            hook.remove()
    assert problems == []
    assert len(seen) > len(owners) // 2  # most weight-holding modules ran through their forward
    check_masters()


def watch_placements(pipe):
    """Forward pre-hooks that record, the first time each model computes, where every model's weights are."""
    records, hooks = {}, []
    for name in MODELS:

        def record(module, args, name=name):
            records.setdefault(name, {other: devices(pipe, other) for other in MODELS})

        hooks += [sub.register_forward_pre_hook(record) for sub in getattr(pipe, name).modules()]
    return records, hooks


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_model_offload_puts_one_model_at_a_time_on_the_device(device, repos):
    """While each model computes, it alone is on the execution device, whole; the rest wait in CPU RAM, and
    all are back there after each call. On a machine without an accelerator the meta device stands in for one:
    nothing can be computed there, so the run stops at the first check of its values (each stage's latents, then
    the images), after the model in question has run."""
    pipe = load(repos)
    pipe.enable_model_cpu_offload(device=device)
    records, hooks = watch_placements(pipe)
    embeddings = torch.zeros(1, 16, 3, 3)
    calls = [
        lambda: pipe(PROMPT, **RUN),
        lambda: pipe.decoder_pipe(embeddings, PROMPT, num_inference_steps=2, guidance_scale=2.0, output_type="pt"),
        lambda: pipe.decoder_pipe.decode(torch.zeros(1, 4, 32, 32)),
    ]
    try:
        for call in calls:
            with pytest.raises(RuntimeError, match="meta") if device == "meta" else contextlib.nullcontext():
                call()
            assert all(devices(pipe, name) == {"cpu"} for name in MODELS)
    finally:
        for hook in hooks:
            hook.remove()
    assert list(records) == list(MODELS)
    for name, placement in records.items():
        assert placement == {other: {device} if other == name else {"cpu"} for other in MODELS}, name


# ---------------------------------------------------------------------------------------------------------
# dtypes and refusals


@pytest.mark.parametrize("method", METHODS)
def test_dtype_change_while_offloading(method, repos):
    prior, _ = repos
    kwargs = dict(height=128, width=128, num_inference_steps=1)
    plain = wurst.WuerstchenPriorPipeline.from_pretrained(prior).to(torch.float64)
    offloaded = wurst.WuerstchenPriorPipeline.from_pretrained(prior)
    getattr(offloaded, method)(device="cpu")
    assert offloaded.to(torch.float64) is offloaded and offloaded.dtype == torch.float64
    results = []
    for pipe in (plain, offloaded):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kwargs).image_embeddings)
    assert results[1].dtype == torch.float64 and torch.equal(results[0], results[1])


@pytest.mark.parametrize("method", METHODS)
def test_no_accelerator_and_no_device_is_one_line_naming_the_method(method, repos, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prior, decoder = repos
    pipes = [load(repos), wurst.WuerstchenPriorPipeline.from_pretrained(prior),
             wurst.WuerstchenDecoderPipeline.from_pretrained(decoder)]
    for pipe in pipes:
        for kwargs in (dict(), dict(gpu_id=0)):
            with pytest.raises(ValueError, match=method) as info:
                getattr(pipe, method)(**kwargs)
            assert "\n" not in str(info.value) and "accelerator" in str(info.value)


@pytest.mark.parametrize("method", METHODS)
def test_to_device_while_offloading_is_refused(method, repos):
    pipe = load(repos)
    getattr(pipe, method)(device="cpu")
    for target in (pipe, pipe.prior_pipe, pipe.decoder_pipe):  # the combined pipeline offloads both pipes
        with pytest.raises(ValueError, match="offload") as info:
            target.to("cpu")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", METHODS)
def test_offload_refuses_low_memory(method, repos):
    pipe = load(repos, low_memory=True)
    for target in (pipe, pipe.prior_pipe, pipe.decoder_pipe):
        with pytest.raises(ValueError, match="low_memory") as info:
            getattr(target, method)(device="cpu")
        assert method in str(info.value) and "\n" not in str(info.value)
