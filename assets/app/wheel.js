() => {
  // The mouse wheel over the slice image steps through the slices, as in a radiology viewer: one slice per notch
  // (about 100 px; a touchpad's small deltas add up to it), down toward slice 1 (the patient's feet in the axial
  // plane), up away from it. It moves the slider as a drag would (an input event).
  let pending = 0;
  document.addEventListener("wheel", (event) => {
    const image = event.target.closest && event.target.closest("#slice-view");
    const slider = document.querySelector("#slice-slider input[type=range]");
    if (!image || !slider || slider.disabled) return;
    event.preventDefault();
    pending += event.deltaMode === 1 ? 40 * event.deltaY : event.deltaY;  // Firefox counts lines
    const steps = Math.trunc(pending / 100);
    if (steps === 0) return;
    pending -= 100 * steps;
    const value = Math.min(Number(slider.max), Math.max(Number(slider.min), Number(slider.value) - steps));
    if (value === Number(slider.value)) return;
    slider.value = String(value);
    slider.dispatchEvent(new Event("input", {bubbles: true}));
  }, {passive: false});
}
