/** A problem with an operator's command (its arguments, the collector it names): printed as the one line it is, no stack. */
export class CliError extends Error {}
