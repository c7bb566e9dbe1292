"""Transform files that 3D Slicer, ITK and PLUS read and write, as our ``a_to_b`` matrices.

In memory a transform is always ``a_to_b`` (4 x 4): it maps points in frame a to frame b, RAS mm
(or, for PLUS's Image frame, pixels). On disk:

- ITK text ``.tfm`` / ``.txt`` (``AffineTransform_double_3_3``) and ITK HDF5 ``.h5`` (through
  SimpleITK, when installed; h5py is not a dependency): LPS, and in the *resampling* direction,
  from the parent (fixed, b) to the child (moving, a). Slicer applies ``a_to_b`` to a node in
  frame a when it loads the file whose matrix is ``T = D inv(a_to_b) D`` with D = diag(-1, -1, 1)
  (https://slicer.readthedocs.io/en/latest/developer_guide/modules/transforms.html). Reading
  inverts that.
- our text: the 16 numbers of ``a_to_b``, 4 rows of 4 (``--reference-to-mri`` always took this).
- PLUS device-set XML: ``<CoordinateDefinitions><Transform From="a" To="b" Matrix="16 numbers,
  row-major"/>``, the frames' own units (Image in pixels), no RAS/LPS (PLUS frames have none).

Writes are atomic (a temporary file renamed over the target): a failed write leaves nothing half
written. Reads refuse what they cannot interpret with the file, the field and what was expected.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from regseg.errors import InputError
from regseg.geometry import check_affine

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse
_ITK_LINEAR = ("AffineTransform_double_3_3", "AffineTransform_float_3_3",
               "MatrixOffsetTransformBase_double_3_3", "MatrixOffsetTransformBase_float_3_3")
_ITK_RIGID = ("Euler3DTransform_double_3_3", "Euler3DTransform_float_3_3")
_HDF5 = (".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Largest transform file read. One linear transform is under 1 KB as text and about 8 KB as ITK
#: HDF5; a PLUS device-set config is tens of KB. The cap bounds what is read, parsed and (HDF5)
#: decompressed; a bigger file (e.g. a displacement field) is refused before it is opened.
MAX_TEXT_BYTES = 4 * 2**20
MAX_HDF5_BYTES = 2**20


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ras_to_itk(a_to_b: np.ndarray) -> np.ndarray:
    """The LPS resampling matrix (b -> a) Slicer writes for the RAS modelling matrix a_to_b."""
    return LPS @ np.linalg.inv(a_to_b) @ LPS


def itk_to_ras(itk_lps: np.ndarray) -> np.ndarray:
    """The RAS modelling matrix a_to_b of an ITK LPS resampling matrix (b -> a)."""
    return LPS @ np.linalg.inv(itk_lps) @ LPS


def _itk_text(itk_lps: np.ndarray) -> str:
    params = [*itk_lps[:3, :3].reshape(9), *itk_lps[:3, 3]]
    return ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {' '.join(repr(float(v)) for v in params)}\nFixedParameters: 0 0 0\n")


def _euler_matrix(angles: np.ndarray) -> np.ndarray:
    """ITK Euler3DTransform's rotation (ZXY order by default: R = Rz Rx Ry)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx @ ry


def _itk_matrix(kind: str, params: list[float], fixed: list[float], what: str) -> np.ndarray:
    m = np.eye(4)
    if kind in _ITK_LINEAR and len(params) == 12:
        m[:3, :3] = np.reshape(params[:9], (3, 3))
    elif kind in _ITK_RIGID and len(params) == 6:
        m[:3, :3] = _euler_matrix(np.asarray(params[:3]))
    else:
        raise InputError(f"{what}: ITK transform {kind} with {len(params)} parameters; an "
                         f"affine ({_ITK_LINEAR[0]}, 12 parameters) or {_ITK_RIGID[0]} (6) is "
                         "expected. Harden or export the transform as linear in Slicer.")
    centre = np.zeros(3) if len(fixed) < 3 else np.asarray(fixed[:3])
    # ITK: y = A (x - c) + c + t
    m[:3, 3] = np.asarray(params[-3:]) + centre - m[:3, :3] @ centre
    return m


def read_itk_text(path: str | os.PathLike) -> np.ndarray:
    """a_to_b (RAS) from an ITK ``.tfm``/``.txt`` holding one linear transform."""
    path = Path(path)
    found: list[tuple[str, list[float], list[float]]] = []
    kind = None
    params: list[float] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise InputError(f"{path}: not an ITK transform file (first line {lines[:1]}); "
                         "'#Insight Transform File V1.0' expected")
    try:
        for line in lines:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "Transform":
                kind = value.strip()
            elif key == "Parameters" and kind:
                params = [float(v) for v in value.split()]
            elif key == "FixedParameters" and kind:
                if not kind.startswith("CompositeTransform"):
                    found.append((kind, params, [float(v) for v in value.split()]))
                kind = None
    except ValueError as exc:
        raise InputError(f"{path}: unreadable number in the parameters ({exc})") from None
    if len(found) != 1:
        raise InputError(f"{path}: {len(found)} transforms; exactly one linear transform "
                         "expected (harden a composite in Slicer first)")
    itk = _itk_matrix(*found[0], what=str(path))
    return check_affine(itk_to_ras(check_affine(itk, what=str(path))), what=str(path))


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise InputError("ITK HDF5 transforms (.h5) need SimpleITK (pip install SimpleITK, or the "
                         "'bench' extra); use .tfm or .txt instead") from None
    return sitk


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null for the duration (native libraries' diagnostics)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def read_itk_h5(path: str | os.PathLike) -> np.ndarray:
    """a_to_b (RAS) from an ITK ``.h5`` transform (one linear transform), via SimpleITK."""
    sitk = _sitk()
    try:
        with open(path, "rb") as f:
            head = f.read(len(_HDF5_SIGNATURE))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if head != _HDF5_SIGNATURE:
        raise InputError(f"{path}: not an HDF5 file (it starts with {head!r}); an ITK .h5 "
                         "transform as Slicer saves it, or a .tfm/.txt, is expected")
    try:
        with _stderr_silenced():  # HDF5 prints its whole error stack on fd 2
            t = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: an HDF5 file but not a readable ITK transform "
                         f"({str(exc).strip().splitlines()[-1].strip()}); save the transform "
                         "from Slicer again, or as .tfm") from None
    while t.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(t)
        if composite.GetNumberOfTransforms() != 1:
            raise InputError(f"{path}: composite of {composite.GetNumberOfTransforms()} "
                             "transforms; exactly one linear transform expected")
        t = composite.GetNthTransform(0)
    kind = f"{t.GetName()}_double_3_3"
    return check_affine(itk_to_ras(_itk_matrix(kind, list(t.GetParameters()),
                                               list(t.GetFixedParameters()), str(path))),
                        what=str(path))


def write_itk(path: str | os.PathLike, a_to_b: np.ndarray) -> Path:
    """Write a_to_b so that Slicer, loading ``path``, maps nodes in frame a into frame b."""
    itk = ras_to_itk(check_affine(a_to_b, what=f"transform to write to {path}"))
    if str(path).lower().endswith(_HDF5):
        sitk = _sitk()
        t = sitk.AffineTransform(3)
        t.SetMatrix([float(v) for v in itk[:3, :3].reshape(9)])
        t.SetTranslation([float(v) for v in itk[:3, 3]])
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.h5")
        try:
            sitk.WriteTransform(t, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    return write_atomic(path, _itk_text(itk))


def read_matrix_text(path: str | os.PathLike) -> np.ndarray:
    """a_to_b from our text: 4 rows of 4 numbers."""
    try:
        with warnings.catch_warnings():  # an empty file: a warning, then shape (0, 1) below
            warnings.simplefilter("ignore", UserWarning)
            m = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read a matrix ({exc}); a text file with 4 rows of 4 "
                         "numbers, or an ITK transform (.tfm/.txt/.h5), is expected") from None
    return check_affine(m, what=str(path))


def write_matrix_text(path: str | os.PathLike, a_to_b: np.ndarray) -> Path:
    m = check_affine(a_to_b, what=f"transform to write to {path}")
    return write_atomic(path, "\n".join(" ".join(repr(float(v)) for v in row) for row in m)
                        + "\n")


def read_plus_transforms(path: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """The ``CoordinateDefinitions`` of a PLUS device-set XML: {(From, To): {"matrix", "error",
    "date"}} (matrices unchecked here; :func:`read_transform` checks the one it returns)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError, LookupError, ValueError, RecursionError) as exc:
        # LookupError: an unknown encoding= in the XML declaration
        raise InputError(f"{path}: not a readable XML file ({type(exc).__name__}: {exc}); a "
                         "PLUS device-set configuration (UTF-8 XML) is expected") from None
    out = {}
    for node in root.iter("Transform"):
        a, b, text = node.get("From"), node.get("To"), node.get("Matrix")
        if not (a and b and text):
            continue
        try:
            values = np.array([float(v) for v in text.split()], dtype=np.float64)
        except ValueError:
            values = np.zeros(0)
        if values.size != 16:
            raise InputError(f"{path}: Transform From={a!r} To={b!r}: Matrix {text!r}; 16 "
                             "numbers (row-major 4x4) expected")
        if (a, b) in out:
            raise InputError(f"{path}: Transform From={a!r} To={b!r} is defined twice; one "
                             "definition per pair of frames expected (which one is meant?)")
        out[(a, b)] = {"matrix": values.reshape(4, 4), "error": node.get("Error"),
                       "date": node.get("Date")}
    return out


def write_plus_transform(path: str | os.PathLike, a_to_b: np.ndarray, from_name: str,
                         to_name: str, *, error_mm: float | None = None) -> Path:
    """Set ``From=from_name To=to_name`` in the CoordinateDefinitions of a PLUS device-set XML.

    An existing file (a PLUS config) keeps everything else and gets the transform replaced or
    added; a new file is a minimal ``<PlusConfiguration>`` holding only the definition.
    """
    m = check_affine(a_to_b, what=f"{from_name}To{to_name} to write to {path}")
    path = Path(path)
    if path.exists():
        try:
            tree = ET.parse(path)
        except (ET.ParseError, LookupError, ValueError) as exc:
            raise InputError(f"{path}: exists but is not XML ({exc}); refusing to overwrite "
                             "it") from None
        root = tree.getroot()
    else:
        root = ET.Element("PlusConfiguration", version="2.1")
        tree = ET.ElementTree(root)
    defs = root.find(".//CoordinateDefinitions")
    if defs is None:
        defs = ET.SubElement(root, "CoordinateDefinitions")
    node = next((t for t in defs.findall("Transform")
                 if t.get("From") == from_name and t.get("To") == to_name), None)
    if node is None:
        node = ET.SubElement(defs, "Transform", From=from_name, To=to_name)
    node.set("Matrix", "  ".join(" ".join(repr(float(v)) for v in row) for row in m))
    if error_mm is not None:
        node.set("Error", f"{error_mm:.4f}")
    node.set("Date", time.strftime("%m%d%y_%H%M%S"))
    ET.indent(tree)
    return write_atomic(path, ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")


def _is_itk_text(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline(64).startswith("#Insight Transform File")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def read_transform(path: str | os.PathLike, *, from_name: str | None = None,
                   to_name: str | None = None) -> np.ndarray:
    """a_to_b from any supported file, by its name and content.

    ``.tfm`` and ``.txt`` starting with ``#Insight Transform File``: ITK text; ``.h5``: ITK
    HDF5; ``.xml``: PLUS CoordinateDefinitions, the transform ``from_name`` -> ``to_name``
    (its inverse when only that one is defined); anything else: 4 rows of 4 numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    name = path.name.lower()
    limit = MAX_HDF5_BYTES if name.endswith(_HDF5) else MAX_TEXT_BYTES
    size = path.stat().st_size
    if size > limit:
        raise InputError(f"{path}: {size:,} bytes; a transform file of at most {limit:,} bytes "
                         "(one linear transform) is expected")
    if name.endswith(_HDF5):
        return read_itk_h5(path)
    if name.endswith(".xml"):
        defs = read_plus_transforms(path)
        if (from_name, to_name) in defs and (to_name, from_name) in defs:
            raise InputError(f"{path}: both {from_name}To{to_name} and {to_name}To{from_name} "
                             "are defined; one of them expected (which one is meant?)")
        if (from_name, to_name) in defs:
            m = defs[(from_name, to_name)]["matrix"]
        elif (to_name, from_name) in defs:
            m = np.linalg.inv(check_affine(defs[(to_name, from_name)]["matrix"], what=str(path)))
        else:
            have = ", ".join(f"{a}To{b}" for a, b in defs) or "none"
            raise InputError(f"{path}: no Transform From={from_name!r} To={to_name!r} in its "
                             f"CoordinateDefinitions (it has: {have})")
        return check_affine(m, what=f"{path} {from_name}To{to_name}")
    if name.endswith(".tfm") or _is_itk_text(path):
        return read_itk_text(path)
    return read_matrix_text(path)


def write_transform(path: str | os.PathLike, a_to_b: np.ndarray, *, from_name: str = "From",
                    to_name: str = "To", error_mm: float | None = None) -> Path:
    """Write a_to_b in the format the name asks for: ``.tfm``/``.h5``: ITK (Slicer);
    ``.xml``: PLUS CoordinateDefinitions; ``.txt`` or anything else: 4 rows of 4 numbers."""
    name = str(path).lower()
    if name.endswith((".tfm", *_HDF5)):
        return write_itk(path, a_to_b)
    if name.endswith(".xml"):
        return write_plus_transform(path, a_to_b, from_name, to_name, error_mm=error_mm)
    return write_matrix_text(path, a_to_b)
