"""
The command line of every script, nanoGPT-like: --preset=NAME, then --key=value overrides of a config dataclass's
fields (a bare --flag means True). A field's --help text is in its metadata: option(default, "what it is"), or
dataclasses.field(metadata={"help": ...}); metadata may add choices (the values allowed) and section (a heading in
--help for this field and those after it). A value that cannot work ends the script with one line that names it.
"""

import dataclasses
import difflib
import os
import sys
import textwrap
import typing

BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def option(default, help="", **metadata):
    """A config field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def require(condition, message):
    """An error that ends the script before it starts: one line, named key."""
    if not condition:
        raise SystemExit(f"error: {message}")


def check_at_least(config, minimum, *names):
    """Each named field (unless it is None) must be at least minimum."""
    for name in names:
        value = getattr(config, name)
        require(value is None or value >= minimum, f"--{name}={value}: must be at least {minimum}")


def convert(key, text, field_type, choices=None):
    """The text of --key=text as the field's type."""
    if typing.get_origin(field_type) is typing.Union:  # Optional[X]: "none" means None
        if text.lower() == "none":
            return None
        field_type = next(t for t in typing.get_args(field_type) if t is not type(None))
    if typing.get_origin(field_type) is typing.Literal:
        field_type, choices = str, typing.get_args(field_type)
    require(not choices or text in choices, f"--{key}={text}: choose one of {', '.join(choices or ())}")
    try:
        if field_type is bool:
            return BOOLEANS[text.lower()]
        if field_type is int and "e" in text.lower() and float(text).is_integer():  # 1e6
            return int(float(text))
        return field_type(text)  # int, float, str
    except (KeyError, ValueError):
        raise SystemExit(f"error: --{key}={text}: expected a value of type {field_type.__name__}") from None


def type_name(field_type, choices=None):
    if choices or typing.get_origin(field_type) is typing.Literal:
        return "{" + ",".join(choices or typing.get_args(field_type)) + "}"
    if typing.get_origin(field_type) is typing.Union:
        return " or ".join("none" if t is type(None) else type_name(t) for t in typing.get_args(field_type))
    return "[BOOL]" if field_type is bool else field_type.__name__.upper()


def help_value(value):
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) and (not value or value != value.strip()) else str(value)


def help_text(config_cls, presets, default_preset, usage, description):
    """--help: the usage, the description, the presets and what each changes, then every key with its type, default
    and help, under its section (or, without one, the name of the class that declares it)."""
    lines = [f"usage: {usage} [--key=value ...]   (a bare --flag means --flag=true)", "", description.strip()]
    if presets is not None:
        lines += ["", "presets (--preset=NAME; --key=value overrides apply on top of it):"]
        for name, values in presets.items():
            changes = " ".join(f"{k}={v}" for k, v in values.items()) or "the defaults below"
            lines.append(textwrap.fill(f"{name}{' (the default)' if name == default_preset else ''}: {changes}", 116,
                                       initial_indent="  ", subsequent_indent="      "))
    owner = {}  # the class that declares each field first
    for cls in reversed(config_cls.__mro__):
        owner.update({name: cls.__name__ for name in vars(cls).get("__annotations__", {}) if name not in owner})
    types, shown = typing.get_type_hints(config_cls), [f for f in dataclasses.fields(config_cls) if f.name != "preset"]
    for f, before in zip(shown, [None] + shown[:-1]):
        if before is None or "section" in f.metadata or owner[f.name] != owner[before.name]:
            lines += ["", f"{f.metadata.get('section', owner[f.name])}:"]
        left = f"  --{f.name} {type_name(types[f.name], f.metadata.get('choices'))}"
        text = "; ".join(t for t in (f"default {help_value(f.default)}", f.metadata.get("help", "")) if t)
        if len(left) > 30:  # the help starts on the next line
            lines, left = lines + [left], ""
        lines += textwrap.wrap(text, 120, initial_indent=left.ljust(32), subsequent_indent=" " * 32,
                               break_on_hyphens=False)
    return "\n".join(lines)


def parse_config(config_cls, presets, argv=None, default_preset="paper", usage=None, description=None):
    """config_cls built from --preset=NAME (a dict of field overrides; presets None: no presets) and --key=value
    overrides. --help (or -h) prints every key and exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    module = sys.modules.get(config_cls.__module__)
    if "--help" in argv or "-h" in argv:
        script = os.path.basename(getattr(module, "__file__", "") or "script.py")
        usage = usage or f"python {script}" + (" [--preset=NAME]" if presets is not None else "")
        print(help_text(config_cls, presets, default_preset, usage,
                        description if description is not None else (module.__doc__ or "")))
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    types, values = typing.get_type_hints(config_cls), {}
    for arg in argv:
        key, has_value, text = arg[2:].partition("=")
        require(arg.startswith("--"), f"unexpected argument {arg!r}; use --key=value (--help lists the keys)")
        if key not in fields or (key == "preset" and presets is None):
            near = difflib.get_close_matches(key, list(fields), n=1)
            raise SystemExit(f"error: unknown config key --{key}" + (f"; did you mean --{near[0]}?" if near else "")
                             + " (--help lists the keys)")
        require(has_value or types[key] is bool, f"--{key} needs a value: --{key}=VALUE")
        choices = tuple(presets) if key == "preset" else fields[key].metadata.get("choices")
        values[key] = convert(key, text, types[key], choices) if has_value else True
    if presets is not None:
        preset = values.setdefault("preset", default_preset)
        values = {**presets[preset], **values}
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def cli_keys(argv=None):
    """The keys given on the command line (parse_config has checked them), e.g. to refuse ones that do not apply."""
    argv = sys.argv[1:] if argv is None else argv
    return {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}


def print_config(config, heading=None):
    """heading (what runs), then every field of the config."""
    if heading:
        print(f"{heading}; config:")
    width = max(len(f.name) for f in dataclasses.fields(config))
    for f in dataclasses.fields(config):
        print(f"  {f.name:<{width}} = {getattr(config, f.name)!r}")


def run_script(main):
    """Run a script's main(); Ctrl-C ends it with a line instead of a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        quit_interrupted()


def quit_interrupted(note=""):
    """Exit 130 after Ctrl-C, as a shell expects."""
    print("\ninterrupted" + (f": {note}" if note else ""), file=sys.stderr)
    raise SystemExit(130)
