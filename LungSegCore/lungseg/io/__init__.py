"""Reading radiographs and writing results: images, DICOM, labelmaps, DICOM-SEG, atomic files."""
