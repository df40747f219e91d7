"""Tests for sora_jax.prompts: caption-style extension, the callable hook, the prompt filter."""
import pytest

from sora_jax.data import moving_mnist, real_clips, sources
from sora_jax.inference import prompts

EXPECTED = {
    # digits
    "3 right": "the digit 3 moves right",
    "digit 3 going right": "the digit 3 moves right",
    "three moves up": "the digit 3 moves up",
    "a 3 moving to the left and 7 up": "the digit 3 moves left and the digit 7 moves up",
    "5 leftwards": "the digit 5 moves left",
    "Eight heading Downward!": "the digit 8 moves down",
    "zero goes upwards": "the digit 0 moves up",
    "9 from left to right": "the digit 9 moves right",
    "3 and 7 moving up": "the digit 3 moves up and the digit 7 moves up",
    "4": "the digit 4",
    "the number four": "the digit 4",
    "The digit 3 moves right.": "the digit 3 moves right",
    "the digit 2 moves down while the digit 6 moves left":
        "the digit 2 moves down and the digit 6 moves left",
    # real clips
    "bikes": "a clip from bikes",
    "bikes video": "a clip from bikes",
    "Big Buck Bunny": "a clip from big buck bunny",
    "bigbuckbunny footage": "a clip from big buck bunny",
    "a still frame from bikes": "a frame from bikes",
    "carphone_pristine": "a clip from carphone",
    # photos
    "coffee": "a photo of coffee",
    "photo of coffee": "a photo of coffee",
    "a picture of the hubble deep field": "a photo of hubble deep field",
    "motorcycle left": "a photo of motorcycle left",
}

UNKNOWN = [
    "a cat sitting on a mat",
    "3 cats walk left",  # a digit, but "cats" is not understood
    "3 left and 7",  # some digits move, others not: outside the training grammar
    "3 up down",  # two directions for one digit
    "left 3",  # direction before any digit
    "37 moves right",
    "bikes and coffee",
]


@pytest.mark.parametrize("prompt, caption", sorted(EXPECTED.items()))
def test_caption_style_table(prompt, caption):
    extend = prompts.CaptionStyleExtender()
    assert extend(prompt) == caption
    assert extend(caption) == caption  # idempotent
    if caption.startswith("the digit"):
        parsed = moving_mnist.parse_caption(caption)
        assert moving_mnist.caption_for([d for d, _ in parsed], [m for _, m in parsed]) == caption


def test_training_captions_unchanged():
    extend = prompts.CaptionStyleExtender()
    captions = [
        moving_mnist.caption_for([3], ["right"]),
        moving_mnist.caption_for([3, 7], ["left", "up"]),
        moving_mnist.caption_for([3], [None]),
    ]
    captions += [real_clips.video_caption(v, t) for v in sources.VIDEOS for t in (1, 17)]
    captions += [real_clips.photo_caption(p) for p in sources.PHOTOS]
    for caption in captions:
        assert extend(caption) == caption, caption


@pytest.mark.parametrize("prompt", UNKNOWN)
def test_unknown_prompt_is_only_stripped(prompt):
    extend = prompts.CaptionStyleExtender()
    assert extend(f"  {prompt}\n") == prompt


def test_deterministic_and_rejects_non_str():
    a, b = prompts.CaptionStyleExtender(), prompts.CaptionStyleExtender()
    for prompt in list(EXPECTED) + UNKNOWN:
        assert a(prompt) == b(prompt) == a(prompt)
    with pytest.raises(TypeError, match="str"):
        a(3)


def test_identity_extender():
    assert prompts.IdentityExtender()("  3 right ") == "  3 right "


def shout(prompt: str) -> str:
    """A stand-in for a user's local language model."""
    return prompt.upper() + "!"


def test_callable_extender_hook():
    ext = prompts.CallableExtender(shout)
    assert ext("a cat") == "A CAT!"
    with pytest.raises(TypeError, match="callable"):
        prompts.CallableExtender("not a function")
    with pytest.raises(TypeError, match="must return a str, got int"):
        prompts.CallableExtender(lambda p: 42)("a cat")
    with pytest.raises(ValueError, match="empty"):
        prompts.CallableExtender(lambda p: "   ")("a cat")


def test_make_extender(tmp_path, monkeypatch):
    assert isinstance(prompts.make_extender("caption_style"), prompts.CaptionStyleExtender)
    assert isinstance(prompts.make_extender("none"), prompts.IdentityExtender)

    (tmp_path / "my_local_llm.py").write_text("def rewrite(p):\n    return 'rewritten: ' + p\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ext = prompts.make_extender("my_local_llm:rewrite")
    assert isinstance(ext, prompts.CallableExtender)
    assert ext("3 right") == "rewritten: 3 right"

    with pytest.raises(ValueError, match="'llm'.*caption_style"):
        prompts.make_extender("llm")
    with pytest.raises(ValueError, match="cannot import"):
        prompts.make_extender("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute"):
        prompts.make_extender("my_local_llm:missing")


# the quickstart's filter section: blocked_terms None = the default list
DEFAULT_FILTER = {"enabled": True, "blocked_terms": None, "blocked_patterns": ()}


@pytest.mark.parametrize("prompt, term", [
    ("Gore!", "gore"),
    ("so much GORE.", "gore"),
    ("a DeepFake of the president", "deepfake"),
    ("make a face-swap video", "face swap"),
])
def test_default_filter_refuses(prompt, term):
    with pytest.raises(prompts.PromptRefused, match=f"refused by the configured.*'{term}'") as e:
        prompts.make_filter(DEFAULT_FILTER).check(prompt)
    assert isinstance(e.value, ValueError) and e.value.term == term


@pytest.mark.parametrize("prompt", [
    "the digit 3 moves right", "a clip from bikes", "a photo of coffee", "gorey details", "",
])
def test_default_filter_allows(prompt):
    assert prompts.make_filter(DEFAULT_FILTER).check(prompt) is None


def test_configured_filter():
    f = prompts.make_filter({"enabled": True, "blocked_terms": ["Red Panda"],
                             "blocked_patterns": [r"\bdigit\s+[89]\b"]})
    f.check("gore")  # the configured list replaces the defaults
    f.check("the digit 7 moves up")
    with pytest.raises(prompts.PromptRefused, match="Red Panda"):
        f.check("a red  PANDA, running")
    with pytest.raises(prompts.PromptRefused, match="blocked pattern") as e:
        f.check("The Digit 8 moves left")
    assert e.value.term == r"\bdigit\s+[89]\b" and e.value.kind == "pattern"
    off = prompts.make_filter({"enabled": False, "blocked_terms": ["gore"], "blocked_patterns": []})
    off.check("gore deepfake")
    with pytest.raises(TypeError, match="list"):
        prompts.PromptFilter(blocked_terms="gore")
    with pytest.raises(ValueError, match="compile"):
        prompts.PromptFilter(blocked_patterns=["("])


def test_make_filter_accepts_config_dict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"enabled": True, "blocked_terms": ["bikes"], "blocked_patterns": []})
    with pytest.raises(prompts.PromptRefused):
        prompts.make_filter(cfg).check("a clip from bikes")
