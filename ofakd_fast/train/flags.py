"""argparse types with clear messages: bounded numbers, ``key=value`` model arguments."""
import argparse
import ast
import math


def number(kind, name, low=None, high=None, low_open=False, high_open=False, expected=None):
    """An argparse type: `kind` (int or float) within [low, high] (open ends as flagged); clear messages."""
    if expected is None and low is not None and high is not None:
        expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif expected is None and low is not None:
        expected = {(0, True): "a positive number", (0, False): "a number >= 0",
                    (1, False): "a number >= 1"}.get((low, low_open), f"a number {'>' if low_open else '>='} {low}")
    elif expected is None:
        expected = "a number"
    if kind is int and expected.startswith("a number"):
        expected = expected.replace("a number", "an integer")

    def convert(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = name  # argparse names the type in its messages
    return convert


positive_int = number(int, "positive integer", 1, expected="a positive integer")
nonneg_int = number(int, "integer >= 0", 0)
positive_float = number(float, "positive number", 0, low_open=True)
nonneg_float = number(float, "number >= 0", 0)
probability = number(float, "probability", 0, 1)
smoothing_value = number(float, "smoothing", 0, 1, high_open=True)
ema_decay = number(float, "decay", 0, 1, low_open=True, high_open=True)
stage_value = number(int, "stage", 1, 4)


def kwargs_pair(text):
    """``key=value`` with a Python literal value (``img_size=28``, ``depths=(2,2)``) or a plain string."""
    if isinstance(text, dict):
        return text
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return {key.strip().replace("-", "_"): value}


class MergeKwargs(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        merged = {}
        for pair in values:
            merged.update(pair)
        setattr(namespace, self.dest, merged)


def whole_number(name, low=0):
    """An argparse type: an integer >= `low`, also written as a float with no fraction ('3.0': the original
    train.py's args.yaml writes ``--aug-repeats`` as a float)."""
    expected = f"a whole number >= {low}"

    def convert(text):
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or not value.is_integer() or value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return int(value)

    convert.__name__ = name
    return convert
