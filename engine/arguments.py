"""Command-line arguments every command shares (sample, generate, serve, evaluate): the family
and the sampling settings. Each family checks and fills its own settings (resolve_settings)."""
from __future__ import annotations


def add_family_argument(parser) -> None:
    from .families import families

    parser.add_argument("--family", default=None, choices=sorted(families()),
                        help="model family (default: recognised from the checkpoint)")


def add_setting_arguments(parser) -> None:
    """The sampling settings every command takes; each family checks and fills its own."""
    parser.add_argument("--num-iter", type=int, default=None,
                        help="sampling steps (default: the model's, else the family's published one)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's, or 1)")
    parser.add_argument("--cfg-schedule", default=None, help="e.g. linear, constant (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None, help="(default: the model's, or 1)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k of the categorical draw (binary-token models)")
    parser.add_argument("--top-p", type=float, default=None, help="top-p of the categorical draw (binary-token models)")
