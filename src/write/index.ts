/** The raw → qcow2 writer: sources, clusterize, the external sink, convert() and wrap(). */
export { clusterize, clusterizeBatches, createClusterizeStream, type ClusterizeOptions, type ClusterizeStream } from './clusterize.js';
export { BufferPool, createFileBlockSource, fileHandleTarget, readBatches, readBlocks, READ_SIZE, type BlockSourceOptions, type BlockSourceStream, type FileHandleTargetOptions, type ReadFn, type ReadTarget } from './sources.js';
export { MetadataEmitter, type ClusterState, type MetadataEmitterOptions, type MetadataResult } from './metadata.js';
export { AllocationBitmap } from './bitmap.js';
export { WriterSinkStream, type ItemWriter } from './sink-stream.js';
export { ExternalWriter, ExternalSinkStream, createExternalSink, writeExternal, type ExternalSinkOptions, type SinkResult, type WriteExternalOptions } from './external-sink.js';
export {
  convert,
  createConvertStream,
  type ConvertInput,
  type ConvertOptions,
  type ConvertProgress,
  type ConvertStage,
  type ConvertStages,
  type StagePoint,
  type ConvertStream,
  type ConvertStreamOptions,
  type ConvertSummary,
} from './convert.js';
export { wrap, type WrapOptions, type WrapSummary } from './wrap.js';
export { resolveImageSettings, type ImageOptions, type ImageSettings } from './settings.js';
export { InternalImageWriter, InternalSinkStream, createInternalSink, writeInternal, type InternalImageOptions, type InternalSummary, type WriteInternalOptions, type WriteInternalResult } from './internal-sink.js';
export { type ImageShape, type WriteSummary } from './settings.js';
export { nbdBlocks, planClusterRuns, ClusterSweep, type ClusterKind, type ClusterRun, type NbdBlockSourceOptions, type PlanClusterRunsOptions } from './nbd-source.js';
export { CompressorPool, compressBlocks, canCompressZstd, checkCompressionType, type CompressionType, type CompressorPoolOptions, type CompressBlocksOptions, type CompressedBatch } from './compress.js';
export { measure, type MeasureOptions, type MeasureResult, type FileMeasure } from './measure.js';
