"""Every size limit of MedVLM 3D in one place.

The loader checks these from file headers before any pixel data is read, the app passes
`MAX_UPLOAD_BYTES` to Gradio, and the pipeline caps generation with `MAX_NEW_TOKENS`.
"""

MAX_UPLOAD_BYTES = 1_000_000_000  # one upload (a file, a folder's files or a zip), as sent by the browser
# float32 voxels of one volume: 10⁹ bytes = 250 million voxels (512 × 512 × 950). Loading holds the stored
# voxels and up to two float32 copies, so the largest volume allowed stays under 3 GB of memory.
MAX_VOXEL_BYTES = 1_000_000_000
MAX_SIDE = 2048  # voxels along any one axis
MIN_SLICES = 2  # fewer along any axis is a 2D image, not a volume
MAX_ZIP_ENTRIES = 5000  # files inside one zip
MAX_ZIP_BYTES = 3_000_000_000  # total uncompressed size of one zip's members
MAX_ZIP_DIRECTORY_BYTES = 1024 * MAX_ZIP_ENTRIES  # a zip's central directory, read before its entries are counted
# Real scans compress a few-fold (a mostly empty PET or mask a few hundred-fold at most); DEFLATE's ceiling is
# about 1000-fold, reached only by constant data: a gzip or zip bomb. Checked once the data exceeds the floor.
MAX_COMPRESSION_RATIO = 400
COMPRESSION_CHECK_BYTES = 64_000_000  # smaller payloads are cheap enough to inflate whatever their ratio
MAX_DICOM_FILES = 5000  # files of one DICOM upload (folder, list or zip)
MAX_DICOM_IMAGES = 20_000  # images of one series, frames counted: all the stacks of a dynamic series
MAX_NEW_TOKENS = 1024  # cap on tokens generated for one answer or report
MAX_QUESTION_CHARS = 2000  # one chat question; the demo model reads 1024 tokens in all, scan included
MIN_ANSWER_TOKENS = 32  # room an answer needs within the LM's context: a longer conversation is refused
