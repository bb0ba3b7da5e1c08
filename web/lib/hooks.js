// Chain a method onto a node class's prototype, keeping what was there (other extensions'
// hooks, the frontend's own): ``after(proto, "onNodeCreated", function () { ... })`` runs the
// original first, then ours, and returns the original's result.
export function after(proto, name, fn) {
  const original = proto[name];
  proto[name] = function (...args) {
    const r = original?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}
