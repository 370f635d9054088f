"""--decoder auto|decord|torchcodec|pyav: every decoder gives the frames the sampler asked for,
"auto" follows the measured order and passes over a decoder that is not here, torchcodec's CPU
and CUDA paths (skipped where it does not load), and the trainer's flag reaches the loaders."""
import types

import numpy as np
import pytest

from hvfm.data import DecodeError, decode_clip
from hvfm.data import decode
from hvfm.data.loading.shards import decode_bytes
from videos import frame_index, write_clip

TORCHCODEC, WHY = decode.torchcodec_status()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("c") / "c.mp4", frames=30, width=64, height=48)


@pytest.mark.parametrize("name", ["decord", "torchcodec", "pyav"])
def test_each_decoder_gives_the_sampled_frames(clip, name):
    if decode.available_decoders()[name] is not None:
        pytest.skip(decode.available_decoders()[name])
    for seed in range(3):
        frames, used = decode_clip(clip, 8, True, np.random.default_rng(seed), decoder=name)
        want = decode.sample_indices(30, 8, True, np.random.default_rng(seed))
        assert used == name and frames.shape == (8, 48, 64, 3)
        assert [frame_index(f) for f in frames] == want
    data = clip.read_bytes()
    a = decode_bytes(data, 8, True, np.random.default_rng(1), 24, name)
    b, _ = decode_clip(clip, 8, True, np.random.default_rng(1), 24, name)
    assert a.shape == (8, 24, 32, 3) and np.array_equal(a, b)


def test_auto_follows_the_measured_order_and_passes_over_missing_decoders(clip, monkeypatch):
    assert decode.AUTO_ORDER == ("decord", "torchcodec", "pyav")
    assert decode.decoder_order("auto") == decode.AUTO_ORDER and decode.decoder_order("pyav") == ("pyav",)
    with pytest.raises(ValueError, match="unknown decoder 'ffmpeg'; choose one of auto, decord, torchcodec, pyav"):
        decode.decoder_order("ffmpeg")
    first = next(d for d in decode.AUTO_ORDER if decode.available_decoders()[d] is None)
    assert decode_clip(clip, 4, decoder="auto")[1] == first
    gone = {"decord": "decord not installed", "torchcodec": "torchcodec does not load (test)", "pyav": None}
    monkeypatch.setattr(decode, "available_decoders", lambda: gone)
    assert decode_clip(clip, 4, decoder="auto")[1] == "pyav"  # passed over, silently
    with pytest.raises(DecodeError, match="torchcodec does not load .test."):
        decode_clip(clip, 4, decoder="torchcodec")  # asked for by name: the reason, in one line


@pytest.mark.skipif(TORCHCODEC is not None, reason="torchcodec loads here")
def test_torchcodec_missing_is_one_clear_reason(clip):
    assert "torchcodec does not load" in WHY and "--decoder decord/pyav" in WHY
    with pytest.raises(DecodeError) as e:
        decode_clip(clip, 4, decoder="torchcodec")
    assert e.value.kind == "bad" and "pip install 'hvfm[torchcodec]'" in str(e.value)


@pytest.mark.skipif(TORCHCODEC is None, reason=f"torchcodec does not load here: {WHY}")
def test_torchcodec_cuda_path_decodes_on_the_device(clip):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = decode.decode_torchcodec(str(clip), 8, True, np.random.default_rng(0), 24)
    gpu = decode.decode_torchcodec(str(clip), 8, True, np.random.default_rng(0), 24, device="cuda")
    assert gpu.is_cuda and gpu.dtype == torch.uint8 and tuple(gpu.shape) == cpu.shape
    assert (gpu.cpu().numpy().astype(int) - cpu.astype(int)).__abs__().mean() < 3  # NVDEC vs FFmpeg
    one = decode.decode_torchcodec(str(clip), 1, False, None, None, device="cuda")  # the exact middle
    assert one.shape[0] == 1 and abs(frame_index(one[0].cpu().numpy()) - 14.5) <= 0.5


def test_the_trainers_decoder_flag_reaches_both_loaders(tmp_path, monkeypatch):
    from hvfm import build
    from hvfm.config import parse_args
    args = parse_args(["--deepspeed", "ds_configs/z2.json", "--train-csv", "x.csv", "--video-root", ".",
                       "--decoder", "pyav"])
    assert args.decoder == "pyav"
    seen = {}
    import hvfm.data
    import hvfm.data.loading.shards
    monkeypatch.setattr(hvfm.data, "build_loader", lambda ann, tok, **kw: seen.setdefault("files", kw))
    monkeypatch.setattr(hvfm.data.loading.shards, "build_shard_loader", lambda spec, tok, **kw: seen.setdefault("shards", kw))
    ns = types.SimpleNamespace(**{**vars(args), "train_shards": None})
    build.build_train_loader(ns, None, None, 2, 32, 0, 1, False)
    build.build_train_loader(types.SimpleNamespace(**{**vars(args), "train_shards": "s"}), None, None, 2, 32, 0, 1, False)
    for kind in ("files", "shards"):
        assert seen[kind]["decoder"] == "pyav" and seen[kind]["decode_timeout"] == args.decode_timeout
