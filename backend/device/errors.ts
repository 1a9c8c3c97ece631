/**
 * A control command that fails: the status goes back to the driver, the
 * message into the log.
 */
import { Status } from '../abi/constants.js';

export class ControlError extends Error {
  constructor(
    readonly status: Status,
    message: string,
  ) {
    super(message);
    this.name = 'ControlError';
  }
}

export const invalid = (msg: string): ControlError => new ControlError(Status.EINVAL, msg);
export const noent = (msg: string): ControlError => new ControlError(Status.ENOENT, msg);
