import dataclasses


def leaf_fields(cls) -> list[dataclasses.Field]:
    """The fields of a script's ``Config`` with its nested groups' fields in their place (their flags carry no
    prefix: ``--seed``, not ``--run.seed``)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out += leaf_fields(type(default)) if dataclasses.is_dataclass(default) else [f]
    return out
