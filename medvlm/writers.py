"""The one place that writes scans: NIfTI, DICOM series (single- and multi-frame) and M3D-style .npy.

Every writer takes the canonical grid of `Volume.data`: float (Z, Y, X) with x toward the patient's
Right, y toward Anterior, z toward Superior (RAS+), and spacing (z, y, x) in mm. Each is the inverse
of `load_volume`: what a writer stores, the loader gives back (up to the stored dtype's rounding).
The volume's centre is placed at the scanner origin (0, 0, 0).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["save_dicom_enhanced", "save_dicom_series", "save_nifti", "save_npy"]

MODALITY_TAG = "modality="  # NIfTI `descrip` prefix through which a scan's modality survives the round trip

# Made-up identifiers written when the caller gives none: never a real person.
ANONYMOUS_PATIENT = {
    "PatientName": "Anonymous^Phantom",
    "PatientID": "PHANTOM",
    "PatientBirthDate": "",
    "AccessionNumber": "",
    "InstitutionName": "",
}
_SOP_CLASS = {  # (0008,0016) SOPClassUID of a single-frame image per modality
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_ENHANCED_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2.1", "MR": "1.2.840.10008.5.1.4.1.1.4.1",
                       "PT": "1.2.840.10008.5.1.4.1.1.130"}


def _centred_origin_ras(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS mm of voxel (0, 0, 0) as (x, y, z), so that the volume's centre lies at the origin."""
    z, y, x = (-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True))
    return np.array([x, y, z])


def save_nifti(path: str | Path, data: np.ndarray, spacing: Sequence[float], orientation: str = "RAS", *,
               dtype: np.dtype | type | str | None = None, modality: str | None = None) -> Path:
    """Write canonical (Z, Y, X) RAS+ `data` as NIfTI, its voxel axes stored along `orientation`.

    orientation: three axis codes such as "RAS", "LAS", "LPS" or "PIR", the order and direction of the
    stored array's axes. `.nii` or `.nii.gz` follows the suffix of `path`. dtype: the stored type
    (default float32); an integer dtype stores rounded values (e.g. int16 for CT in HU). modality: "CT",
    "MR", "PT" or "OT", kept in the header's description so that `load_volume` reports it.
    """
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, ornt_transform

    path = Path(path)
    data = np.asarray(data)
    stored_dtype = np.dtype(dtype or np.float32)
    if stored_dtype.kind in "iu":
        info = np.iinfo(stored_dtype)
        data = np.rint(data)
        if data.min() < info.min or data.max() > info.max:
            raise ValueError(f"values from {data.min()} to {data.max()} do not fit {stored_dtype}")
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    affine[:3, 3] = _centred_origin_ras(data.shape, spacing)
    image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(stored_dtype), affine)  # (X, Y, Z)
    image = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(orientation))))
    image.set_data_dtype(stored_dtype)
    image.header.set_xyzt_units("mm")
    if modality:
        image.header["descrip"] = f"{MODALITY_TAG}{modality}".encode()
    nib.save(image, path)
    return path


def _stored_pixels(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Real values to the 16-bit integers DICOM stores: round((value - intercept) / slope)."""
    stored = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    for dtype in (np.uint16, np.int16):
        info = np.iinfo(dtype)
        if stored.min() >= info.min and stored.max() <= info.max:
            return stored.astype(dtype)
    raise ValueError(f"values from {values.min()} to {values.max()} do not fit 16 bits with slope {slope} and "
                     f"intercept {intercept}; choose a larger slope")


def _base_dataset(modality: str, sop_class: str, series_uid: str, study_uid: str, series_description: str,
                  patient: dict | None, series_number: int | None):
    """A Dataset with file meta, patient, study and series modules filled; pixel modules are the caller's."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Manufacturer = "MedVLM phantom"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid
    ds.SeriesDescription = series_description
    if series_number is not None:
        ds.SeriesNumber = series_number
    ds.StudyDate = ds.SeriesDate = "20000101"
    for keyword, value in {**ANONYMOUS_PATIENT, **(patient or {})}.items():
        setattr(ds, keyword, value)
    return ds


def _set_pixels(ds, stored: np.ndarray, transfer_syntax: str | None) -> None:
    """Attach (frames,) rows × columns 16-bit grey pixels, compressed when a transfer syntax asks for it."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(stored.dtype == np.int16)  # (0028,0103) 1 = signed
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    if transfer_syntax is not None and transfer_syntax != ds.file_meta.TransferSyntaxUID:
        ds.compress(transfer_syntax)


def _display_slices(data: np.ndarray) -> np.ndarray:
    """(Z, Y, X) RAS+ to DICOM's axial pixel order: row 0 anterior going posterior, column 0 right going left."""
    return np.asarray(data)[:, ::-1, ::-1]


def _slice_positions_lps(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """(Z, 3) ImagePositionPatient (LPS mm) of the first transmitted pixel of each axial slice."""
    origin = _centred_origin_ras(shape, spacing)
    num_slices, rows, cols = shape
    corner_ras = origin + np.array([(cols - 1) * spacing[2], (rows - 1) * spacing[1], 0.0])
    positions = np.tile(corner_ras, (num_slices, 1))
    positions[:, 2] += np.arange(num_slices) * spacing[0]
    return positions * np.array([-1.0, -1.0, 1.0])  # RAS → LPS


def _file_name(number: int, file_names: str) -> str:
    if file_names == "instance":
        return f"IM{number:04d}.dcm"
    if file_names == "shuffled":
        return secrets.token_hex(8)
    raise ValueError(f"file_names must be 'instance' or 'shuffled', not {file_names!r}")


def save_dicom_series(folder: str | Path, data: np.ndarray, spacing: Sequence[float], modality: str = "CT", *,
                      series_description: str = "", series_number: int | None = 1, patient: dict | None = None,
                      slope: float = 1.0, intercept: float = 0.0, file_names: str = "instance",
                      series_uid: str | None = None, transfer_syntax: str | None = None) -> list[Path]:
    """Write canonical (Z, Y, X) RAS+ `data` as an axial DICOM series, one file per slice, into `folder`.

    Standard axial geometry: ImageOrientationPatient [1, 0, 0, 0, 1, 0] (LPS: columns toward the patient's
    left, rows toward posterior), ImagePositionPatient per slice, PixelSpacing (y, x), SliceThickness z.
    Pixels are stored as 16-bit integers round((value - intercept) / slope) with RescaleSlope/Intercept.
    patient: PatientName, PatientID, PatientBirthDate, AccessionNumber, InstitutionName to write (default:
    made-up anonymous values). series_number: (0020,0011), None to leave it out. file_names: "instance"
    (IM0001.dcm, ...) or "shuffled" (random names, no extension). transfer_syntax: a pydicom UID such as
    RLELossless to compress (default: uncompressed).
    Returns the written paths, in slice order (inferior first).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    stored = _stored_pixels(_display_slices(data), slope, intercept)  # (Z, rows, cols)
    positions = _slice_positions_lps(data.shape, spacing)
    paths = []
    for index, (pixels, position) in enumerate(zip(stored, positions, strict=True)):
        ds = _base_dataset(modality, _SOP_CLASS.get(modality, _SECONDARY_CAPTURE), series_uid, study_uid,
                           series_description, patient, series_number)
        ds.InstanceNumber = index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # (0020,0037)
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]  # (0020,0032)
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]  # (0028,0030) between rows, between columns
        ds.SliceThickness = float(spacing[0])
        ds.RescaleSlope, ds.RescaleIntercept = float(slope), float(intercept)  # (0028,1053), (0028,1052)
        _set_pixels(ds, pixels, transfer_syntax)
        path = folder / _file_name(index + 1, file_names)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def save_dicom_enhanced(path: str | Path, data: np.ndarray, spacing: Sequence[float], modality: str = "CT", *,
                        series_description: str = "", series_number: int | None = 1, patient: dict | None = None,
                        slope: float = 1.0, intercept: float = 0.0, series_uid: str | None = None) -> Path:
    """Write canonical (Z, Y, X) RAS+ `data` as one multi-frame (enhanced) DICOM file, one frame per slice.

    Geometry as `save_dicom_series`, carried by the functional groups: PlaneOrientationSequence,
    PixelMeasuresSequence and PixelValueTransformationSequence shared, PlanePositionSequence per frame.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    path = Path(path)
    ds = _base_dataset(modality, _ENHANCED_SOP_CLASS.get(modality, _SECONDARY_CAPTURE),
                       series_uid or generate_uid(), generate_uid(), series_description, patient, series_number)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = data.shape[0]
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing = [float(spacing[1]), float(spacing[2])]
    measures.SliceThickness = float(spacing[0])
    transform.RescaleSlope, transform.RescaleIntercept = float(slope), float(intercept)
    shared.PlaneOrientationSequence = DicomSequence([orientation])  # (0020,9116)
    shared.PixelMeasuresSequence = DicomSequence([measures])  # (0028,9110)
    shared.PixelValueTransformationSequence = DicomSequence([transform])  # (0028,9145)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])  # (5200,9229)
    frames = []
    for position in _slice_positions_lps(data.shape, spacing):
        plane, frame = Dataset(), Dataset()
        plane.ImagePositionPatient = [round(float(v), 6) for v in position]
        frame.PlanePositionSequence = DicomSequence([plane])  # (0020,9113)
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)  # (5200,9230)
    _set_pixels(ds, _stored_pixels(_display_slices(data), slope, intercept), None)
    ds.save_as(path, enforce_file_format=True)
    return path


def save_npy(path: str | Path, data: np.ndarray) -> Path:
    """Write canonical (Z, Y, X) RAS+ `data`, already scaled to [0, 1], as an M3D-style .npy.

    Stored as float32 (1, Z, Y, X) in display order: `arr[0, d]` is an axial slice as a viewer shows it
    (row 0 anterior, column 0 the patient's right), d increasing toward superior; spacing is not kept
    (M3D arrays are taken as 1 mm). The exact inverse of `load_volume` on a .npy.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.size and (np.nanmin(data) < 0.0 or np.nanmax(data) > 1.0):
        raise ValueError("M3D .npy volumes hold values in [0, 1]; window and scale the data first "
                         "(preprocess.apply_window)")
    path = Path(path)
    np.save(path, np.ascontiguousarray(_display_slices(data))[None])
    return path
