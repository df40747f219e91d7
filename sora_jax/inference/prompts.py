"""What happens to a user prompt before text encoding: extension into caption style, and filtering.

The model only ever saw captions of a few fixed forms (see :mod:`sora_jax.data`):

  * Moving MNIST clips: "the digit 3 moves right",
    "the digit 3 moves left and the digit 7 moves up"; single frames: "the digit 3"
    (``moving_mnist.caption_for``);
  * real clips: "a clip from bikes", single frames "a frame from bikes"
    (``real_clips.video_caption``);
  * photos: "a photo of coffee" (``real_clips.photo_caption``).

A `PromptExtender` maps a prompt to the text that is encoded. The default, `CaptionStyleExtender`,
rewrites short prompts such as "3 right" into that grammar with fixed rules, so that a prompt the
model can render is phrased the way it was trained. `CallableExtender` wraps any local
``str -> str`` function instead (e.g. a user's own language model), and `make_extender` builds
either from a config string.

`PromptFilter` refuses prompts that contain configured terms or match configured regexes.
"""
from __future__ import annotations

import abc
import importlib
import re
import unicodedata
from typing import Any, Callable, Mapping, Optional, Sequence

from sora_jax.data import moving_mnist, real_clips, sources

__all__ = [
    "PromptExtender",
    "CaptionStyleExtender",
    "CallableExtender",
    "IdentityExtender",
    "make_extender",
    "EXTENDERS",
    "EXTENDER_CHOICES",
    "PromptRefused",
    "PromptFilter",
    "DEFAULT_BLOCKED_TERMS",
    "make_filter",
]


# ----------------------------------------------------------------------------- extenders


class PromptExtender(abc.ABC):
    """Maps a user prompt to the text given to the text encoder: ``extender(prompt) -> str``."""

    @abc.abstractmethod
    def __call__(self, prompt: str) -> str:
        """Returns the extended prompt.

        Raises:
          TypeError: ``prompt`` is not a str.
        """


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt


class IdentityExtender(PromptExtender):
    """Returns the prompt unchanged."""

    def __call__(self, prompt: str) -> str:
        return _check_prompt(prompt)

    def __repr__(self) -> str:
        return "IdentityExtender()"


def _tokens(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation, underscores and extra spaces dropped."""
    return re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).casefold())


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGITS = {**{str(d): d for d in range(10)}, **{w: d for d, w in enumerate(_NUMBER_WORDS)}}
_DIRECTIONS = {
    f"{name}{suffix}": name
    for name in moving_mnist.DIRECTIONS
    for suffix in ("", "ward", "wards")
}
# Multi-word motions that name an end point: "from left to right" moves right. Longest first, so
# that "from left to right" is rewritten before "left to right".
_DIRECTION_PHRASES = (
    ("from left to right", "right"),
    ("from right to left", "left"),
    ("from top to bottom", "down"),
    ("from bottom to top", "up"),
    ("left to right", "right"),
    ("right to left", "left"),
    ("top to bottom", "down"),
    ("bottom to top", "up"),
)
# Words that may surround digits and directions without changing the meaning of a digit prompt.
# Any other word makes the digit rule decline, so that e.g. "3 cats walk left" is left alone.
_DIGIT_FILLERS = frozenset(
    "a an the digit digits number numbers numeral handwritten mnist is are "
    "moves move moving goes go going heads heading travels traveling travelling drifts drifting "
    "slides sliding scrolls scrolling to toward towards and while video clip of with".split()
)
_CLIP_FILLERS = frozenset("a an the clip video footage movie film scene from of".split())
_FRAME_WORDS = frozenset("frame still image picture photo photograph snapshot".split())
_PHOTO_FILLERS = frozenset("a an the photo photograph picture image pic of".split())


def _name_forms(*names: str) -> set[str]:
    """Ways to write a source name: "big buck bunny", "bigbuckbunny", "carphone pristine"."""
    forms = set()
    for name in names:
        words = _tokens(name)
        forms.update((" ".join(words), "".join(words)))
    return forms


def _display_name(video: str) -> str:
    return real_clips.video_caption(video, 2).removeprefix("a clip from ")


_VIDEO_FORMS = {form: v for v in sources.VIDEOS for form in _name_forms(v, _display_name(v))}
_PHOTO_FORMS = {form: p for p in sources.PHOTOS for form in _name_forms(p)}


def _digit_caption(words: list[str]) -> Optional[str]:
    """Moving MNIST caption for a digit prompt, or None if some word is not understood."""
    joined = f" {' '.join(words)} "
    for phrase, direction in _DIRECTION_PHRASES:
        joined = joined.replace(f" {phrase} ", f" {direction} ")
    digits: list[int] = []
    directions: list[Optional[str]] = []
    waiting: list[int] = []  # digits named since the last direction: "3 and 7 move up" moves both
    for word in joined.split():
        if word in _DIGITS:
            digits.append(_DIGITS[word])
            directions.append(None)
            waiting.append(len(digits) - 1)
        elif word in _DIRECTIONS:
            if not waiting:  # "3 up down" or a direction before any digit: ambiguous
                return None
            for i in waiting:
                directions[i] = _DIRECTIONS[word]
            waiting = []
        elif word not in _DIGIT_FILLERS:
            return None
    # Training captions either move every digit (clips) or none (single frames); a mix such as
    # "3 left and 7" is outside that grammar.
    if not digits or len({d is None for d in directions}) > 1:
        return None
    return moving_mnist.caption_for(digits, directions)


def _clip_caption(words: list[str]) -> Optional[str]:
    """ "a clip from bikes" / "a frame from bikes" for a prompt naming a bundled video."""
    name = _VIDEO_FORMS.get(" ".join(w for w in words if w not in _CLIP_FILLERS | _FRAME_WORDS))
    if name is None:
        return None
    return real_clips.video_caption(name, 1 if _FRAME_WORDS.intersection(words) else 2)


def _photo_caption(words: list[str]) -> Optional[str]:
    """ "a photo of coffee" for a prompt naming a bundled photo."""
    name = _PHOTO_FORMS.get(" ".join(w for w in words if w not in _PHOTO_FILLERS))
    return None if name is None else real_clips.photo_caption(name)


class CaptionStyleExtender(PromptExtender):
    """Rewrites short prompts into the training-caption grammar with fixed rules (the default).

    Rules, tried in this order on the lower-cased words of the prompt (punctuation ignored):

      1. Digits: every word is a digit ("0".."9" or "zero".."nine"), a direction ("left",
         "leftward(s)", ... and "from left to right" etc.) or a connecting word ("the", "digit",
         "moving", "going", "to", "and", ...). A direction applies to the digits named since the
         previous direction. "3 right", "digit 3 going right", "three moves up",
         "a 3 moving to the left and 7 up" -> "the digit 3 moves right", ...,
         "the digit 3 moves left and the digit 7 moves up"; "3" -> "the digit 3". Prompts that
         move some digits but not others are not rewritten.
      2. Bundled videos (``sora_jax.data.sources.VIDEOS``, by file or display name):
         "bikes", "bikes video" -> "a clip from bikes"; with a word such as "frame", "still" or
         "image" -> "a frame from bikes".
      3. Bundled photos (``sora_jax.data.sources.PHOTOS``): "coffee", "photo of coffee" ->
         "a photo of coffee".

    A prompt already in caption style comes back in its canonical form (lower case, single
    spaces, no trailing period, "and" between digits). A prompt no rule understands comes back
    with surrounding whitespace stripped and is otherwise unchanged. The mapping is pure and
    deterministic.
    """

    def __call__(self, prompt: str) -> str:
        """Returns the caption-style prompt, or ``prompt.strip()`` if no rule applies.

        Raises:
          TypeError: ``prompt`` is not a str.
        """
        words = _tokens(_check_prompt(prompt))
        for rule in (_digit_caption, _clip_caption, _photo_caption):
            caption = rule(words)
            if caption is not None:
                return caption
        return prompt.strip()

    def __repr__(self) -> str:
        return "CaptionStyleExtender()"


class CallableExtender(PromptExtender):
    """Wraps a local ``str -> str`` callable, e.g. a user's own language model, as an extender.

    Args:
      fn: called with the prompt; must return a non-empty str, which is used as is.

    Raises:
      TypeError: ``fn`` is not callable (at construction), or it returns something other than
        a str (at call time).
      ValueError: ``fn`` returns an empty or all-whitespace str.
    """

    def __init__(self, fn: Callable[[str], str]):
        if not callable(fn):
            raise TypeError(
                f"CallableExtender needs a callable str -> str, got {type(fn).__name__}"
            )
        self.fn = fn

    def _name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or repr(self.fn)

    def __call__(self, prompt: str) -> str:
        out = self.fn(_check_prompt(prompt))
        if not isinstance(out, str):
            raise TypeError(
                f"prompt extender {self._name()} must return a str, got {type(out).__name__}"
            )
        if not out.strip():
            raise ValueError(
                f"prompt extender {self._name()} returned an empty prompt for {prompt!r}"
            )
        return out

    def __repr__(self) -> str:
        return f"CallableExtender({self._name()})"


EXTENDERS = ("caption_style", "none")  # the built-in extenders, by config name
EXTENDER_CHOICES = EXTENDERS + ("module.path:function",)


def make_extender(spec: str) -> PromptExtender:
    """Builds a prompt extender from a config string.

    Args:
      spec: ``"caption_style"`` (`CaptionStyleExtender`), ``"none"`` (`IdentityExtender`), or
        ``"module.path:function"``: the function is imported with importlib and wrapped in
        `CallableExtender` (the module must be importable, e.g. on ``PYTHONPATH``).

    Raises:
      ValueError: an unknown spec, a module that cannot be imported, or a missing or
        non-callable attribute; the message names the spec.
    """
    if spec == "caption_style":
        return CaptionStyleExtender()
    if spec == "none":
        return IdentityExtender()
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown prompt extender {spec!r}; choose from {EXTENDER_CHOICES}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"prompt extender {spec!r}: cannot import module {module_name!r}: {e}"
        ) from e
    fn = module
    for part in attr.split("."):  # "module:Class.method" works too
        if not hasattr(fn, part):
            raise ValueError(f"prompt extender {spec!r}: {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"prompt extender {spec!r}: {attr!r} is not callable")
    return CallableExtender(fn)


# ----------------------------------------------------------------------------- filter


class PromptRefused(ValueError):
    """A prompt matched the configured prompt filter.

    Attributes:
      term: the blocked term or regex pattern, as configured.
      kind: "term" or "pattern".
    """

    def __init__(self, term: str, kind: str = "term"):
        self.term = term
        self.kind = kind
        super().__init__(
            "prompt refused by the configured prompt filter: "
            f"it matches the blocked {kind} {term!r}"
        )


DEFAULT_BLOCKED_TERMS: tuple[str, ...] = (
    # sexual content involving minors
    "child porn",
    "child pornography",
    "csam",
    "underage sex",
    "underage nude",
    # graphic violence
    "gore",
    "gory",
    "beheading",
    "dismemberment",
    "mutilation",
    # impersonating real people
    "deepfake",
    "deepfakes",
    "deep fake",
    "face swap",
    "faceswap",
)


def _normalise(text: str) -> str:
    """Lower-case words separated by single spaces: "Gore!" and "GORE" both become "gore"."""
    return " ".join(_tokens(text))


class PromptFilter:
    """Refuses prompts containing blocked terms or matching blocked regular expressions.

    Terms match whole words or phrases, ignoring case, punctuation and spacing: the term "gore"
    matches "Gore!" and "so much GORE." but not "gorey"; "face swap" matches "Face-Swap".
    Patterns are Python regexes searched in the raw prompt, ignoring case.
    A filter with no terms and no patterns allows everything.

    Args:
      blocked_terms: words or phrases to refuse.
      blocked_patterns: regular expressions to refuse.

    Raises:
      TypeError: ``blocked_terms`` / ``blocked_patterns`` is a single str instead of a list.
      ValueError: a term with no letters or digits, or a pattern that does not compile.
    """

    def __init__(self, blocked_terms: Sequence[str] = DEFAULT_BLOCKED_TERMS,
                 blocked_patterns: Sequence[str] = ()):
        for name, value in (("blocked_terms", blocked_terms),
                            ("blocked_patterns", blocked_patterns)):
            if isinstance(value, (str, bytes)):
                raise TypeError(f"{name} must be a list of str, got the single str {value!r}")
        self.terms: dict[str, str] = {}  # normalised -> as configured, for the error message
        for term in blocked_terms:
            norm = _normalise(str(term))
            if not norm:
                raise ValueError(f"blocked term {term!r} has no letters or digits")
            self.terms.setdefault(norm, str(term))
        self.patterns: list[re.Pattern] = []
        for pattern in blocked_patterns:
            try:
                self.patterns.append(re.compile(str(pattern), re.IGNORECASE))
            except re.error as e:
                raise ValueError(f"blocked pattern {pattern!r} does not compile: {e}") from e

    def check(self, prompt: str) -> None:
        """Returns None if the prompt is allowed.

        Raises:
          PromptRefused: the prompt contains a blocked term or matches a blocked pattern; the
            message names it.
          TypeError: ``prompt`` is not a str.
        """
        padded = f" {_normalise(_check_prompt(prompt))} "
        for norm, term in self.terms.items():
            if f" {norm} " in padded:
                raise PromptRefused(term)
        for pattern in self.patterns:
            if pattern.search(prompt):
                raise PromptRefused(pattern.pattern, kind="pattern")

    def __repr__(self) -> str:
        return f"PromptFilter({len(self.terms)} terms, {len(self.patterns)} patterns)"


def make_filter(cfg: Mapping[str, Any]) -> PromptFilter:
    """Builds a `PromptFilter` from the ``prompt.filter`` config section (dict or ConfigDict).

    Args:
      cfg: mapping with ``enabled`` (False gives a filter that allows everything),
        ``blocked_terms`` (list of str; None: `DEFAULT_BLOCKED_TERMS`) and
        ``blocked_patterns`` (list of regex str).

    Raises:
      KeyError: a key is missing. TypeError, ValueError: as `PromptFilter`.
    """
    if not cfg["enabled"]:
        return PromptFilter(blocked_terms=(), blocked_patterns=())
    terms = cfg["blocked_terms"]
    return PromptFilter(blocked_terms=DEFAULT_BLOCKED_TERMS if terms is None else terms,
                        blocked_patterns=cfg["blocked_patterns"])
