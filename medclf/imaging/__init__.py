"""Images in: decode (JPEG, PNG, DICOM), the one preprocessing function, UID privacy, the Ray Data image stage."""
