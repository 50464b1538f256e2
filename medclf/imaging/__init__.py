"""Images in: decode (JPEG, PNG, DICOM), the one preprocessing function, UID privacy, decode-time checks, the Ray Data image stage."""
