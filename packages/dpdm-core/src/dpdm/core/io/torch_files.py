"""What a user's checkpoint file is, told from its bytes, so each kind gets the right reader or message.

``file_format`` reads the magic bytes: a safetensors file starts with its header's length (8 bytes,
little-endian) and the header's ``{``; ``torch.save`` (PyTorch >= 1.6) writes a zip file (``PK``); a
pickle of protocol 2 or later starts with ``0x80`` and its protocol, one of protocol 0 or 1 with an
ASCII opcode (``(`` MARK, ``c`` GLOBAL, ``}`` EMPTY_DICT, ...).

Pickles are read by ``edm_pickle``'s restricted unpickler, which runs no code. Two kinds of file
that users often have are recognised and explained rather than refused as foreign: a bare state
dict (``torch.save(model.state_dict(), ...)``: weights without the network they belong to, see
``BareStateDict``) and a whole pickled module (``torch.save(model, ...)``: it names the module's
class, which would have to be imported and run; see ``pickled_module_class``, a scan of the
pickle's opcodes that builds nothing).
"""

from __future__ import annotations

import io
import pickletools
import zipfile

import torch

from ..errors import DpdmError

SAFETENSORS, TORCH_ZIP, PICKLE, UNKNOWN = "safetensors", "torch zip", "pickle", "unknown"
# Opcodes a protocol 0 or 1 pickle can start with (no PROTO opcode before them); all printable ASCII.
_OLD_PICKLE_STARTS = b"(c]})NILFGSVJKMUTXPQ"
# Globals that wrap a module's class rather than being it (containers, and the protocol 0/1 constructors).
_NOT_THE_CLASS = {"collections.OrderedDict", "builtins.set", "__builtin__.set", "copyreg._reconstructor",
                  "copy_reg._reconstructor", "builtins.object", "__builtin__.object"}
CONVERT_HINT = "dpdm convert state-dict FILE OUT.safetensors --backbone NAME --shape C,H,W"


def file_format(head: bytes) -> str:
    """The kind of file whose first bytes (16 or more) are ``head``: one of ``SAFETENSORS``, ``TORCH_ZIP``,
    ``PICKLE`` (any protocol) or ``UNKNOWN``."""
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 2**32:  # ASCII text would be a huge length
        return SAFETENSORS
    if head[:4] == b"PK\x03\x04":
        return TORCH_ZIP
    if len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and (head[2] == 0x95 or (head[1] < 4 and head[2])):
        return PICKLE  # PROTO n, then (protocols 4 and 5) a FRAME opcode
    if head[:1] and head[0] in _OLD_PICKLE_STARTS and _opcodes_parse(head):
        return PICKLE
    return UNKNOWN


def _opcodes_parse(head: bytes) -> bool:
    """Whether ``head`` reads as the opening opcodes of a pickle (at least two of them, or a complete pickle)."""
    try:
        for count, (opcode, _, _) in enumerate(pickletools.genops(head), 1):
            if count >= 2 or opcode.name == "STOP":
                return True
    except Exception:  # an unknown opcode, or the head ends inside the first one
        return False
    return False


class BareStateDict(DpdmError):
    """A file that holds only a state dict (``name -> tensor``): weights without a network spec."""

    def __init__(self, source: str, state: dict):
        self.state = state
        names = ", ".join(repr(k) for k in list(state)[:3]) + (", ..." if len(state) > 3 else "")
        super().__init__(
            f"{source!r} is a bare state dict ({len(state)} tensors: {names}) without a network spec; load it into a "
            f"named backbone with `{CONVERT_HINT}` (see --help), or name it as a recipe's teacher.checkpoint (the "
            "recipe's model is its network)")


def is_state_dict(obj) -> bool:
    """A non-empty dict of name -> tensor (what ``nn.Module.state_dict()`` returns)."""
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def whole_module_error(source: str, class_name: str) -> DpdmError:
    return DpdmError(
        f"{source!r} is a whole pickled torch module ({class_name}, saved with torch.save(model, ...)); dpdm does "
        "not unpickle classes, since that can run any code. Save its weights instead, "
        "torch.save(model.state_dict(), 'weights.pt'), and load those into a named backbone with "
        f"`{CONVERT_HINT}` (or name them as a recipe's teacher.checkpoint)")


def pickled_module_class(file, allowed=()) -> str | None:
    """``module.Class`` when the pickle (or ``torch.save`` zip) in the binary, seekable ``file`` is a whole
    ``nn.Module``, else None: its first global (containers aside) is a class outside ``allowed`` (the globals the
    reader resolves), and it holds a module's ``_parameters``, ``_buffers`` and ``_modules``. Reads opcodes only:
    nothing is built or imported."""
    file.seek(0)
    data = file.read()
    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        first, strings, wanted = None, [], {"_parameters", "_buffers", "_modules"}
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and opcode.name != "GLOBAL":
                strings = [*strings[-1:], arg]
                wanted.discard(arg)
            elif first is None and opcode.name in ("GLOBAL", "STACK_GLOBAL"):
                name = arg.replace(" ", ".") if opcode.name == "GLOBAL" else ".".join(strings)
                first = None if name in _NOT_THE_CLASS else name
            if first is not None and (first in allowed or not wanted):
                return None if first in allowed else first
    except Exception:  # not a pickle we can scan: the caller's own message stands
        return None
    return None
