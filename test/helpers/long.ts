/**
 * The suite's long mode (`QCOW2_STREAM_LONG=1`, which `.ci/run` sets for one of its passes):
 * races, kill -9 trials and fuzzing run enough repetitions there to catch a failure that shows
 * once in tens of trials; the default run keeps a few so it stays quick.
 */
export const LONG = process.env['QCOW2_STREAM_LONG'] === '1';

/** `quick` repetitions normally, `long` in long mode. */
export function repetitions(quick: number, long: number): number {
  return LONG ? long : quick;
}
