"""Stand-in for Slicer's SampleData module: registering a custom source and loading one file of it, as
Modules/Scripted/SampleData/SampleData.py does. Line numbers are v5.12.3's (v5.8.1's in brackets).

- registerCustomSampleDataSource (:553-600 [457-505]): `loadFileTypes=None` by default; `loadFileType` is its
  deprecated alias, and both at once are a ValueError. Slicer 5.6 (v5.6.2 :433-470) had only
  `loadFileType="VolumeFile"`; chosen by slicer.parameterNodeWrapper's SLICER_VERSION.
- downloadFromSource (:850-985 [680-800]) for a file with a node name; downloadFile (:1133-1183 [934-980]) reuses
  the file in the cache folder when its checksum matches. Here nothing is downloaded: a missing or different file
  in `CACHE_FOLDER` is a download failure.
- loadNode (:1191-1233 [988-1030]): without a file type, the IO manager's `fileType(path)`; then `loadNodes`;
  storage nodes removed; the first node, or the scene when the reader loaded none (a success all the same).
  Slicer 5.6's loadNode (v5.6.2 :918-944) defaults to "VolumeFile" and fails when no node was loaded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import slicer

CACHE_FOLDER = os.path.join(tempfile.gettempdir(), "slicer-sampledata-cache")  # the scene's RemoteCacheDirectory


def _version():
    from slicer.parameterNodeWrapper import SLICER_VERSION

    return SLICER_VERSION


class SampleDataSource:
    def __init__(
        self,
        sampleName=None,
        uris=None,
        fileNames=None,
        nodeNames=None,
        checksums=None,
        loadFileTypes=None,
        loadFileProperties=None,
        thumbnailFileName=None,
    ):
        self.sampleName, self.thumbnailFileName = sampleName, thumbnailFileName
        self.uris, self.fileNames, self.nodeNames = [uris], [fileNames], [nodeNames]  # one file, as LungSeg's
        self.checksums, self.loadFileTypes = [checksums], [loadFileTypes]
        self.loadFileProperties = dict(loadFileProperties or {})


class SampleDataLogic:
    @staticmethod
    def registerCustomSampleDataSource(
        category="Custom",
        sampleName=None,
        uris=None,
        fileNames=None,
        nodeNames=None,
        customDownloader=None,
        thumbnailFileName=None,
        loadFileTypes=None,
        loadFiles=None,
        loadFileProperties={},
        checksums=None,
        loadFileType=None,
    ):
        if _version() < (5, 8):
            if loadFileTypes is not None:  # no such argument in 5.6
                raise TypeError("registerCustomSampleDataSource() got an unexpected keyword argument 'loadFileTypes'")
            loadFileTypes = "VolumeFile" if loadFileType is None else loadFileType  # 5.6's default
        elif loadFileType is not None:
            if loadFileTypes is not None:
                raise ValueError("loadFileType and loadFileTypes cannot be specified at the same time")
            loadFileTypes = loadFileType
        if not isinstance(uris, str):
            raise NotImplementedError("the stand-in registers one file per source")
        sources = getattr(slicer.modules, "sampleDataSources", None)
        if sources is None:
            sources = slicer.modules.sampleDataSources = {}
        sources.setdefault(category, []).append(
            SampleDataSource(
                sampleName=sampleName,
                uris=uris,
                fileNames=fileNames,
                nodeNames=nodeNames,
                checksums=checksums,
                loadFileTypes=loadFileTypes,
                loadFileProperties=loadFileProperties,
                thumbnailFileName=thumbnailFileName,
            )
        )

    def sourceForSampleName(self, sampleName):
        for sources in getattr(slicer.modules, "sampleDataSources", {}).values():
            for source in sources:
                if source.sampleName == sampleName:
                    return source
        return None

    def downloadSample(self, sampleName):
        return self.downloadSamples(sampleName)[0]

    def downloadSamples(self, sampleName):
        source = self.sourceForSampleName(sampleName)
        return self.downloadFromSource(source) if source else []

    def downloadFromSource(self, source):
        (uri,), (fileName,), (nodeName,) = source.uris, source.fileNames, source.nodeNames
        path = self.downloadFile(uri, CACHE_FOLDER, fileName, source.checksums[0])
        loaded = self.loadNode(path, nodeName, source.loadFileTypes[0], dict(source.loadFileProperties))
        return [loaded] if loaded else []

    def downloadFile(self, uri, destFolderPath, name, checksum=None):
        path = os.path.join(destFolderPath, name)
        algorithm, digest = checksum.split(":") if checksum else (None, None)
        if not os.path.isfile(path) or (
            algorithm and hashlib.new(algorithm.lower(), Path(path).read_bytes()).hexdigest() != digest.lower()
        ):
            raise ValueError(f"Failed to download {uri} to {path} (the tests have no network)")
        return path

    def loadNode(self, uri, name, fileType=None, fileProperties={}):
        manager = slicer.app.coreIOManager()
        fileProperties = dict(fileProperties, fileName=uri, **({"name": name} if name else {}))
        if not fileType:  # 5.8+: the reader that claims the file with the highest confidence
            fileType = manager.fileType(uri)
        import vtk

        loadedNodes = vtk.vtkCollection()
        if not manager.loadNodes(fileType, fileProperties, loadedNodes):
            return None
        if _version() < (5, 8) and loadedNodes.GetNumberOfItems() < 1:  # v5.6.2 :925-927: no node, a failure
            return None
        for i in range(loadedNodes.GetNumberOfItems()):  # read from a temporary folder: no storage node
            node = loadedNodes.GetItemAsObject(i)
            if node.IsA("vtkMRMLStorableNode") and node.GetStorageNode():
                slicer.mrmlScene.RemoveNode(node.GetStorageNode())
                node.SetAndObserveStorageNodeID(None)
        return loadedNodes.GetItemAsObject(0) or slicer.mrmlScene
