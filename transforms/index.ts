/** The public transforms: stages over Blocks, each as a generator and as a Node stream. */
export { zeroDetect, createZeroDetectStream } from './zero-detect.js';
