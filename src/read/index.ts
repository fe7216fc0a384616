/** The qcow2 → raw reader: open images, read and map them, export, check, compare, inspect. */
export {
  openImage,
  openDisk,
  probeFormat,
  type DiskImage,
  type Extent,
  type ExtentKind,
  type ImageFormat,
  type OpenImageOptions,
  type OpenDiskOptions,
} from './image.js';
export { createExportStream, exportStream, exportToFile, EXPORT_CHUNK, type ExportOptions, type ExportReadable, type ExportResult, type ExportStream, type ExportStreamOptions } from './export.js';
export { mapImage, mapEntryOf, formatMapJsonEntry, formatMapHumanRow, MAP_HUMAN_HEADER, type MapEntry } from './map.js';
export { checkImage, MAX_CHECK_CLUSTERS, MAX_CHECK_SNAPSHOT_L1_ENTRIES, type CheckFinding, type CheckOptions, type CheckResult, type FindingSeverity } from './check.js';
export { compareImages, type CompareOptions, type CompareResult } from './compare.js';
export type { ProbeFormatOptions } from './probe.js';
export { readImageInfo, type BitmapInfo, type ImageInfo, type ReadImageInfoOptions, type SnapshotInfo } from './info.js';
