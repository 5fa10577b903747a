/** The last instant a JavaScript Date can hold, either side of 1970 (ECMA-262 §21.4.1.1), in ms. */
export const MAX_DATE_MS = 8.64e15
