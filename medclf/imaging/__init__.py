"""Images in: decode (JPEG, PNG, DICOM; JPEG also on the inference actor's GPU), the one preprocessing function, UID privacy, decode-time checks, the Ray Data image stage."""
